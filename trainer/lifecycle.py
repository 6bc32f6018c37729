"""One job lifecycle for every backend: status in job.json, SIGTERM as a stop request, and how a run
ends (completed, stopped, failed with the error). Our trainer (trainer/entrypoint.py) and the
LlamaFactory backend (trainer/llamafactory/supervise.py) both run their training through `run_job`.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from contract.errors import UserError
from contract.job_folder import SUPERVISED_ENV, now_iso, read_job, update_job


class Stopped(Exception):
    """Raised by a training body that saw the stop request and ended cleanly (after its checkpoint)."""


class StopFlag:
    """Set by SIGTERM; the training body checks it between steps."""

    def __init__(self) -> None:
        self.requested = False

    def __bool__(self) -> bool:
        return self.requested


def run_job(folder: Path, train: Callable[[Path, StopFlag], None], stop_message: str,
            on_stop: Callable[[], None] = lambda: None) -> int:
    """Run `train(folder, stop)` as the job in `folder`; the exit code is 0 only when it completed,
    3 when it stopped on request, 1 when it failed. `on_stop` runs in the signal handler (a backend
    with a child process passes the signal on)."""
    from trainer.distributed import Role, quiet_unless_writer

    folder = Path(folder).resolve()
    role = Role.from_env()  # one process of a distributed job, or the only one
    quiet_unless_writer(role)
    stop = StopFlag()

    def _on_term(signum, frame):
        stop.requested = True
        print(stop_message, flush=True)
        on_stop()

    signal.signal(signal.SIGTERM, _on_term)
    # A watching process on the host holds the job's pid (the local runner's exit watch, the container
    # runner's supervisor: a pid inside a container means nothing to the host); under the distributed
    # launcher the job's pid is the launcher's, which the runner recorded.
    own_pid = {} if (os.environ.get(SUPERVISED_ENV) or role.launched) else {"pid": os.getpid()}
    if role.writes:
        update_job(folder, status="running", started_at=now_iso(), **own_pid)
    try:
        train(folder, stop)
    except Stopped:
        if role.writes:
            update_job(folder, status="stopped", finished_at=now_iso())
        print("status: stopped", flush=True)
        return 3
    except UserError as exc:
        _record_failure(folder, role, str(exc), exc)
        print(f"error: {exc}", flush=True)
        return 1
    except BaseException as exc:  # a crash: keep the traceback in train.log, the message in job.json
        traceback.print_exc()
        _record_failure(folder, role, f"{type(exc).__name__}: {exc}", exc)
        return 1
    if role.writes:
        update_job(folder, status="completed", finished_at=now_iso())
    print("status: completed", flush=True)
    return 0


def _record_failure(folder: Path, role, error: str, exc: BaseException) -> None:
    """Any process's failure fails the job. In a distributed job the first failure recorded stays:
    the others usually follow from it (a collective whose peer is gone)."""
    if role.launched:
        error = f"rank {role.rank}: {error}"
        print(f"error: {error}", file=sys.stderr, flush=True)
        # The launcher's end-of-run summary names the first failed rank; this gives it the error too.
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exc)
        if read_job(folder).get("status") == "failed":
            return
    update_job(folder, status="failed", finished_at=now_iso(), error=error)
