"""What the page shows, read from the job folders with the CLI's own readers (no second source of truth)."""

from __future__ import annotations

import json
from pathlib import Path

from contract.errors import UserError
from contract.job_folder import LOG_FILE, complete_checkpoints, read_metrics
from contract.plan import all_decisions, estimate_of, runner_of
from orchestrator import jobs, monitor

EXPORTS_DIR = "exports"
EXPORT_REPORT = "export_report.json"
EVALUATION_FILE = "evaluation.json"
LOG_TAIL_BYTES = 8192


def jobs_overview() -> list[dict]:
    """One row per job, newest first: `monitor`'s summary plus the runner and the losses to draw."""
    rows = []
    for job in jobs.list_jobs():
        folder = jobs.job_dir(job["job_id"])
        metrics = read_metrics(folder)
        row = monitor.summary(job, metrics)
        row["runner"] = runner_of(job)
        row["created_at"] = job.get("created_at")
        row["losses"] = [[m.get("step"), m["loss"]] for m in metrics if "loss" in m]
        rows.append(row)
    return rows[::-1]


def job_detail(job_id: str) -> dict:
    """Everything the job page shows apart from the metrics stream."""
    folder, job = jobs.get(job_id)  # validates the id as the CLI does
    return {
        # The plan's decisions (start's) with the trainer's, and the plan's estimate: the page shows both.
        "job": {**job, "decisions": all_decisions(job), "estimate": estimate_of(job)},
        "summary": monitor.summary(job, read_metrics(folder)),
        "checkpoints": [p.name for p in complete_checkpoints(folder)],
        "exports": exports(folder),
        "evaluation": _read_json(folder / EVALUATION_FILE),
        "log_tail": log_tail(folder),
    }


def exports(folder: Path) -> list[dict]:
    """The job's export folders with their verification reports (and the GGUF a chat can load)."""
    root = folder / EXPORTS_DIR
    found = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        report = _read_json(path / EXPORT_REPORT)
        if path.is_dir() and report is not None:
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            found.append({"name": path.name, "report": report, "gguf": ggufs[0] if ggufs else None})
    return found


def export_gguf(job_id: str, export_name: str) -> Path:
    """The GGUF of one of the job's exports; names are checked against the listing, never joined blindly."""
    folder, _ = jobs.get(job_id)
    for entry in exports(folder):
        if entry["name"] == export_name and entry["gguf"]:
            return folder / EXPORTS_DIR / entry["name"] / entry["gguf"]
    raise UserError(f"job {job_id} has no GGUF export named {export_name!r}; the job page lists its exports")


def log_tail(folder: Path, size: int = LOG_TAIL_BYTES) -> str:
    path = folder / LOG_FILE
    if not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode(errors="replace")


def dataset_preview(path: str, rows: int = 3) -> list[list[dict]]:
    """The first rows as the trainer reads them (messages), for the new-job form."""
    from inputs.data.records import read_dataset

    return [list(c.messages) for c in read_dataset(Path(path).expanduser())[:rows]]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
