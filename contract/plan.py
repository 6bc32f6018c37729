"""The job plan: what `start` decided for a job, each decision with its reason, kept in job.json.

`llamafarm finetune start` makes every decision the host can make (orchestrator/plan.py), prints it
and writes it under `plan`; the runners and the trainer read it here and never decide again. What
only the training process can know (precision on a GPU, the attention kernel, threads) the trainer
decides and records under `decisions`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from contract.decisions import Decision
from contract.errors import UserError
from contract.job_folder import read_job

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


def all_decisions(job: dict) -> dict:
    """Every decision of a job, the plan's (made by `start`) then the trainer's, as {name: {value, reason}}."""
    planned = {k: v for k, v in (job.get(PLAN_KEY) or {}).items() if k != "estimate"}
    return {**planned, **(job.get("decisions") or {})}
