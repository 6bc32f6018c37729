"""The job registry: creating job folders, listing them, and noticing jobs whose process died."""

from __future__ import annotations

import re
import secrets
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from contract.errors import UserError
from contract.plan import PLAN_KEY, JobPlan
from contract.job_folder import (
    FINAL_DIR,
    FINISHED,
    JOB_FILE,
    STRATEGY_FILE,
    UnreadableJob,
    job_dir,
    jobs_root,
    now_iso,
    pid_alive,
    read_job,
    update_job,
    write_json_atomic,
)

if TYPE_CHECKING:
    from contract.strategy import Strategy


def new_job_id(strategy_name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", strategy_name).strip("-")[:48] or "job"
    return f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def create(strategy_name: str, strategy: Strategy, source: Path, dataset: Path, eval_dataset: Path | None,
           overrides: dict, plan: JobPlan) -> Path:
    """Make the folder of a new pending job with its plan; ids never collide (mkdir is the arbiter)."""
    from contract.strategy import resolved_dict

    root = jobs_root()
    while True:
        folder = root / new_job_id(strategy_name)
        try:
            root.mkdir(parents=True, exist_ok=True)
            folder.mkdir()
            break
        except FileExistsError:
            if folder.is_dir():
                continue  # the same id in the same second: draw again
            raise UserError(f"cannot create job folders in {root}: a file is in the way; "
                            "set LLAMAFARM_HOME to a writable folder") from None
        except OSError as exc:
            raise UserError(f"cannot create job folders in {root}: {exc.strerror}; "
                            "set LLAMAFARM_HOME to a writable folder") from None
    try:
        (folder / STRATEGY_FILE).write_text(
            f"# {strategy_name} from {source}" + (f", with --set {overrides}" if overrides else "") + "\n"
            + yaml.safe_dump(resolved_dict(strategy), sort_keys=False)
        )
        write_json_atomic(
            folder / JOB_FILE,
            {
                "job_id": folder.name,
                "strategy": strategy_name,
                "strategy_source": str(source),
                "overrides": overrides,
                "dataset": str(dataset.resolve()),
                "eval_dataset": str(eval_dataset.resolve()) if eval_dataset else None,
                PLAN_KEY: plan.to_json(),
                "status": "pending",
                "pid": None,
                "created_at": now_iso(),
            },
        )
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # never leave a half-made job behind
        raise
    return folder


def refresh(folder: Path) -> dict:
    """The job's state; a running job whose process is gone is marked failed, not left running. A
    container job whose host-side supervisor is gone runs on while its container does."""
    job = read_job(folder)
    if job.get("status") == "running" or (job.get("status") == "pending" and job.get("pid")):
        if not pid_alive(job.get("pid")):
            time.sleep(0.2)  # it may have written its final status just now
            job = read_job(folder)
            if job.get("status") not in FINISHED and not pid_alive(job.get("pid")) and _container_trains(folder, job):
                return read_job(folder)
            if job.get("status") not in FINISHED and not pid_alive(job.get("pid")):
                job = update_job(
                    folder,
                    status="failed",
                    finished_at=now_iso(),
                    error=f"the training process (pid {job.get('pid')}) ended without reporting a status; "
                    f"see {folder / 'train.log'}",
                )
    return job


def _container_trains(folder: Path, job: dict) -> bool:
    """True, with a note in job.json, when the job's container still trains without its supervisor."""
    from orchestrator.runners.container import container_running

    if not container_running(job):
        return False
    note = (f"its supervisor on the host (pid {job.get('pid')}) is gone, but container {job['container']['name']} "
            "still trains; its output reaches metrics.jsonl, not train.log; `finetune stop` stops it")
    if job.get("note") != note:
        update_job(folder, note=note)
    return True


def list_jobs() -> list[dict]:
    root = jobs_root()
    if not root.exists():
        return []
    jobs = []
    for folder in sorted(root.iterdir()):
        if folder.is_dir() and (folder / JOB_FILE).exists():
            try:
                jobs.append(refresh(folder))
            except UnreadableJob as exc:  # one bad folder must not hide the others
                jobs.append({"job_id": folder.name, "status": "unreadable", "error": str(exc),
                             "job_dir": str(folder)})
    return sorted(jobs, key=lambda j: j.get("created_at") or "")


def get(job_id: str) -> tuple[Path, dict]:
    folder = job_dir(job_id)  # validates the id
    if not (folder / JOB_FILE).exists():
        raise UserError(f"no job with id {job_id!r}; `llamafarm finetune jobs` lists the jobs")
    return folder, refresh(folder)


def export_gguf(path: Path) -> Path | None:
    """The GGUF inside an export folder (gguf or ollama format), so `generate --model EXPORT_DIR` works."""
    if not (path / "export_report.json").is_file():
        return None
    found = sorted(p for p in path.glob("*.gguf") if "adapter" not in p.name)
    return found[0] if len(found) == 1 else None


def model_folder(model: str) -> Path:
    """A job id or a folder to the folder that holds trained weights."""
    path = Path(model).expanduser().resolve()  # the trainer subprocess runs in another folder
    if path.is_dir():
        if (path / FINAL_DIR / STRATEGY_FILE).exists():
            return path / FINAL_DIR
        if (path / STRATEGY_FILE).exists() and not (path / JOB_FILE).exists():
            return path
        from inputs.models.plain_folder import is_causal_lm_folder  # torch-free

        if is_causal_lm_folder(path):  # a merged export or a downloaded Hugging Face model
            return path
        raise UserError(f"{path} holds no trained model (expected a job folder with final/, a final/ folder, "
                        "or a Hugging Face model folder with config.json)")
    if "/" in model or model.startswith("."):
        raise UserError(f"model folder {model} does not exist; a job's model is named by its job id "
                        "(`llamafarm finetune jobs` lists them), e.g. --model-path <job id>")
    folder, job = get(model)
    if job["status"] != "completed":
        detail = f": {job['error']}" if job.get("error") else ""
        raise UserError(f"job {model} is {job['status']}{detail}; only a completed job has final weights")
    return folder / FINAL_DIR
