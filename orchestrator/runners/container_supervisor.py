"""One job's container, watched from the host (the container runner starts this; people don't):

    python -m orchestrator.runners.container_supervisor JOB_DIR CONTAINER_SPEC_JSON

Its pid is the job's pid, so a job is alive exactly while this process is. It creates and starts the
container, copies the container's output to its own stdout (the job's train.log), passes SIGTERM on
to the container (the trainer saves a checkpoint and ends `stopped`), removes the container when it
ends, and turns the exit code into the job's status when the trainer could not write one itself.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from contract.job_folder import FINISHED, end_unreported_run, now_iso, read_job, run_number, update_job
from orchestrator.runners.base import describe_exit
from orchestrator.runners.container import ContainerSpec
from orchestrator.runners.engine import API_VERSION


def _log(msg: str) -> None:
    print(f"container runner: {msg}", flush=True)


def _copy_logs(container) -> None:
    out = sys.stdout.buffer
    for chunk in container.logs(stream=True, follow=True):
        out.write(chunk)
        out.flush()


def _remove_leftover(client, name: str) -> None:
    """A container of an earlier run of this job (a resume after a crash of the host side)."""
    import docker

    try:
        old = client.containers.get(name)
    except docker.errors.NotFound:
        return
    old.remove(force=True)
    _log(f"removed the leftover container {name} of an earlier run")


def supervise(job_dir: Path, spec: ContainerSpec) -> int:
    import docker

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    run = run_number(read_job(job_dir))  # a resume may start the next run before this one is cleaned up
    client = docker.DockerClient(base_url=spec.engine_url, version=API_VERSION, timeout=120)
    _remove_leftover(client, spec.name)
    container = client.containers.create(**spec.create_kwargs(dict(os.environ)))
    update_job(job_dir, container={"id": container.id[:12], "name": spec.name, "image": spec.image,
                                   "engine": spec.engine_url})
    _log(f"container {spec.name} ({container.id[:12]}) from {spec.image}, user {spec.user}, on {spec.engine_url}")
    if stop.is_set():  # stopped while the container was being made: never start it
        container.remove(force=True)
        update_job(job_dir, status="stopped", finished_at=now_iso())
        return 3
    try:
        container.start()
    except Exception:
        container.remove(force=True)  # one that never ran is not left behind in the engine
        raise
    logs = threading.Thread(target=_copy_logs, args=(container,), daemon=True)
    logs.start()
    signalled = False
    while True:
        container.reload()
        if container.status not in ("created", "running"):
            break
        if stop.is_set() and not signalled:
            container.kill(signal="SIGTERM")
            signalled = True
        time.sleep(0.5)
    logs.join(timeout=10)
    code = int(container.attrs["State"]["ExitCode"])
    container.remove(force=True)
    meaning = describe_exit(code)
    status = "stopped" if signalled else "failed"
    if end_unreported_run(job_dir, run, status=status,
                          error=None if signalled else f"the container exited with code {code}: {meaning}; see train.log"):
        _log(f"the container exited with code {code} ({meaning}); job status: {status}")
    return code


def main(argv: list[str]) -> int:
    job_dir, spec_json = argv
    try:
        return supervise(Path(job_dir), ContainerSpec.from_json(spec_json))
    except Exception as exc:  # the engine refused or vanished: the job must not stay "pending"
        if read_job(Path(job_dir)).get("status") not in FINISHED:
            update_job(Path(job_dir), status="failed", finished_at=now_iso(),
                       error=f"the container runner failed: {type(exc).__name__}: {exc}")
        _log(f"failed: {type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
