"""The job folder: the contract between the orchestrator and every runner.

    <LLAMAFARM_HOME>/jobs/<job_id>/
        strategy.yaml     the resolved strategy (overrides applied), the only settings the trainer reads
        job.json          status, pid, runner, timestamps, inputs, decisions, error
        metrics.jsonl     one JSON object per logged step
        train.log         everything the trainer printed
        checkpoints/      checkpoint-<step>/ folders: weights, optimizer.pt, trainer_state.json
        final/            the trained adapter (or full weights) with tokenizer and strategy.yaml
        best/             the same at the lowest eval loss, when training_args.save_best is on

Whoever runs the trainer (a local process, a container, a venv on a Mac) reads and writes these
files the same way, so `monitor` never needs to know which runner ran the job.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from contract.errors import UserError

STRATEGY_FILE = "strategy.yaml"
JOB_FILE = "job.json"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
BEST_DIR = "best"
TRAINER_STATE_FILE = "trainer_state.json"  # written last: a checkpoint without it is incomplete

# Set in the trainer's environment when a process on the host watches it and owns job.json's pid (the
# local runner's exit watch, the container runner's supervisor): the trainer then never records its own.
SUPERVISED_ENV = "LLAMAFARM_SUPERVISED"

STATUSES = ("pending", "running", "completed", "failed", "stopped")
FINISHED = ("completed", "failed", "stopped")

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def llamafarm_home() -> Path:
    return Path(os.environ.get("LLAMAFARM_HOME", Path.home() / ".llamafarm")).expanduser()


def jobs_root() -> Path:
    return llamafarm_home() / "jobs"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_job_id(job_id: str) -> str:
    """Job ids become folder names: refuse anything that could leave the jobs folder."""
    if not _JOB_ID.match(job_id) or ".." in job_id:
        raise UserError(
            f"invalid job id {job_id!r}: use letters, digits, '.', '_' and '-' only "
            "(`llamafarm finetune jobs` lists the ids)"
        )
    return job_id


def job_dir(job_id: str) -> Path:
    return jobs_root() / check_job_id(job_id)


def write_json_atomic(path: Path, data: dict) -> None:
    """Readers never see a half-written file: write a temporary file, then rename over."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; job files are as readable as the folder
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def _locked(folder: Path):
    # The orchestrator (pid, stop) and the trainer (status, progress) both update job.json.
    with open(folder / ".job.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class UnreadableJob(UserError):
    """A job.json that exists but cannot be read (truncated, hand-edited, not JSON)."""


def read_job(folder: Path) -> dict:
    path = Path(folder) / JOB_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no job at {folder} (missing {JOB_FILE}); `llamafarm finetune jobs` lists the jobs") from None
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UnreadableJob(f"job file {path} is unreadable ({exc}); fix or remove that job folder") from None
    if not isinstance(data, dict):
        raise UnreadableJob(f"job file {path} is unreadable (not a JSON object); fix or remove that job folder")
    return data


def update_job(folder: Path, **fields) -> dict:
    """Read-modify-write job.json under a lock; returns the new content."""
    folder = Path(folder)
    with _locked(folder):
        path = folder / JOB_FILE
        data = json.loads(path.read_text()) if path.exists() else {}
        data.update(fields)
        write_json_atomic(path, data)
        return data


def run_number(job: dict) -> int:
    """Which run of the job this is: 0 for the first, one more for each resume."""
    return job.get("resumes", 0)


def end_unreported_run(folder: Path, run: int, **fields) -> bool:
    """Write how a run ended (status, error) for a trainer that could not write it itself (killed
    outright): only while the job is unfinished and still at that run, since a resume may have started
    the next run already. Under the lock, so a status written at the same moment is never overwritten.
    Returns whether it wrote."""
    folder = Path(folder)
    with _locked(folder):
        path = folder / JOB_FILE
        data = json.loads(path.read_text())
        if data.get("status") in FINISHED or run_number(data) != run:
            return False
        data.update(fields, finished_at=now_iso())
        write_json_atomic(path, data)
        return True


def append_metrics(folder: Path, record: dict) -> None:
    with open(Path(folder) / METRICS_FILE, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()


def cut_metrics(folder: Path, step: int) -> None:
    """A resumed run's records follow on from its checkpoint's step: later ones are dropped."""
    path = Path(folder) / METRICS_FILE
    if not path.exists():
        return
    kept = [r for r in read_metrics(folder) if r.get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    tmp.replace(path)


def read_metrics(folder: Path) -> list[dict]:
    path = Path(folder) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line being written right now; the next read gets it
    return records


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); look at its state where /proc exists.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return True


def wait_for_exit(pid: int | None, timeout: float) -> bool:
    """Wait until process `pid` has ended (reaping it when it is a child of ours, which pid_alive cannot
    tell from a live one without /proc); False if it still runs after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while pid:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return True
        except ChildProcessError:
            pass  # not our child: pid_alive tells
        if not pid_alive(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def elapsed_since(iso: str | None) -> float | None:
    if not iso:
        return None
    return time.time() - datetime.fromisoformat(iso).timestamp()


def complete_checkpoints(folder: Path) -> list[Path]:
    """A job's complete checkpoints, oldest first. Half-written ones (a `.tmp` name, or no
    trainer_state.json) are never listed, so resume cannot pick them."""
    root = Path(folder) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        name, _, step = path.name.rpartition("-")
        if name == "checkpoint" and step.isdigit() and (path / TRAINER_STATE_FILE).is_file():
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def read_job_strategy(folder: Path):
    """(Strategy, its YAML text) of a job folder, or of any folder saved with its strategy.yaml (final/,
    best/, a checkpoint): the one reader of that file."""
    import yaml

    from contract.strategy import parse_strategy

    path = Path(folder) / STRATEGY_FILE
    text = path.read_text()
    return parse_strategy(str(path), yaml.safe_load(text)), text
