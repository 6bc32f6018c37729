"""The job plan: what `start` decided for a job, each decision with its reason, kept in job.json.

`llamafarm finetune start` makes every decision the host can make (orchestrator/plan.py), prints it
and writes it under `plan`; the runners and the trainer read it here and never decide again. What
only the training process can know (precision on a GPU, the attention kernel, threads) the trainer
decides and records under `decisions`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from contract.decisions import PRECISIONS, Decision
from contract.errors import UserError
from contract.job_folder import JOB_FILE, UnreadableJob, read_job

PLAN_KEY = "plan"


@dataclass(frozen=True)
class JobPlan:
    device: Decision
    method: Decision
    runner: Decision
    image: Decision | None = None
    """The container image, for the container runner only."""
    distributed: Decision | None = None
    """{"mode", "backend"} for a job of several processes; None for one."""
    estimate: Decision | None = None
    """{"peak_memory_mb", "seconds", "steps", "device"} from `estimate`, or None when none was made."""

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name).to_json() for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_json(cls, data: dict) -> "JobPlan":
        return cls(**{name: Decision.from_json(value) for name, value in data.items()})

    def lines(self) -> list[str]:
        """What `start` prints: one `name: value (reason)` line per decision."""
        shown = []
        for f in fields(self):
            decision = getattr(self, f.name)
            if decision is None or f.name == "estimate":
                continue
            value = decision.value
            if isinstance(value, dict):
                value = " ".join(str(v) for v in value.values())
            shown.append(f"{f.name}: {value} ({decision.reason})")
        return shown


def plan_of(job: dict) -> JobPlan:
    """The plan of a job read from job.json; a job without one predates plans and cannot be run again."""
    if not job.get(PLAN_KEY):
        raise UserError(f"job {job.get('job_id', '?')} has no plan in its job.json (it was made by an older "
                        "llamafarm); start it again with `llamafarm finetune start`")
    return JobPlan.from_json(job[PLAN_KEY])


def read_plan(folder: Path) -> JobPlan:
    return plan_of(read_job(Path(folder)))


def estimate_of(job: dict) -> dict:
    """The estimate `start` made for a job ({} when none), what the trainer checks itself against."""
    plan = job.get(PLAN_KEY) or {}
    return (plan.get("estimate") or {}).get("value") or {}


def runner_of(job: dict) -> str | None:
    """The name of the runner that runs a job (None for a folder without a plan)."""
    return ((job.get(PLAN_KEY) or {}).get("runner") or {}).get("value")


KEPT = "kept from the run this resumes"
KEEPABLE = {  # the trainer's decisions a resumed run keeps: which recorded values it can compute with, in words
    "threads": (lambda v: str(v).isdigit() and int(v) >= 1, "a thread count (a whole number, at least 1)"),
    "precision": (lambda v: v in PRECISIONS, ", ".join(PRECISIONS[:-1]) + f" or {PRECISIONS[-1]}"),
    "compile": (lambda v: v in ("on", "off"), "on or off"),
    "attention_softmax": (lambda v: v in ("fused", "aten"), "fused or aten"),
    "sequence_kernel": (lambda v: v in ("flash", "sdpa"), "flash or sdpa"),
    "attention_segments": (lambda v: v == "off" or (str(v).isdigit() and int(v) >= 1),
                           "off or a sequence length (a whole number, at least 1)"),
    "lora_dropout": (lambda v: v in ("kernel", "fast-mask", "torch", "none"), "kernel, fast-mask, torch or none"),
    "layer_kernel": (lambda v: v in ("kernel", "torch"), "kernel or torch"),
}


def kept_decision(folder: Path, job: dict, name: str) -> Decision | None:
    """The decision `name` (one of KEEPABLE) recorded by the job's last run, as a resume keeps it; None
    when it recorded none. A record the run could not compute with (job.json edited by hand) is an
    UnreadableJob naming the file, the field and what it takes: `finetune resume` checks before it
    launches (`check_kept_decisions`), the trainer when it keeps one."""
    decisions = job.get("decisions") or {}
    where, earlier = (f"decisions.{name}", decisions.get(name)) if isinstance(decisions, dict) else ("decisions", decisions)
    if earlier is None:
        return None
    valid, expected = KEEPABLE[name]
    if not (isinstance(earlier, dict) and valid(earlier.get("value")) and isinstance(earlier.get("reason"), str)):
        raise UnreadableJob(f"job file {Path(folder) / JOB_FILE}: {where} is {json.dumps(earlier)[:200]}, but the "
                            f"run this resumes must have recorded its {name} as {{\"value\": ..., \"reason\": ...}} "
                            f"with the value {expected}; restore what it recorded, or start the strategy again as a "
                            "new job")
    value = str(earlier["value"])
    if earlier["reason"].startswith(KEPT):  # a resume of a resume: the first run's reason, once
        return Decision(value, earlier["reason"])
    return Decision(value, f"{KEPT}, so the resumed steps compute as its steps did (there: {earlier['reason']})")


def check_kept_decisions(folder: Path, job: dict) -> None:
    """Refuse a resume whose kept decisions the trainer could not compute with, before anything starts."""
    for name in KEEPABLE:
        kept_decision(folder, job, name)


def all_decisions(job: dict) -> dict:
    """Every decision of a job, the plan's (made by `start`) then the trainer's, as {name: {value, reason}}."""
    planned = {k: v for k, v in (job.get(PLAN_KEY) or {}).items() if k != "estimate"}
    return {**planned, **(job.get("decisions") or {})}
