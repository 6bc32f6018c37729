"""The local runner: the shared entrypoint as a detached process on this machine, under the exit watch
(runners/exit_watch.py), which turns a trainer killed outright into a job status that says so."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from contract.errors import UserError
from contract.job_folder import LOG_FILE
from orchestrator.runners.base import LaunchSpec
from contract.paths import PROJECT_ROOT


def trainer_env() -> dict[str, str]:
    """The caller's environment plus what the trainer needs; PYTHONPATH makes a plain checkout
    (`python cli.py`) work as well as an installed package."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(PROJECT_ROOT) + (os.pathsep + path if path else "")}


def trainer_argv(*args: str) -> list[str]:
    """The command line of a trainer subcommand (`python -m trainer ...`) in this interpreter."""
    return [sys.executable, "-m", "trainer", *args]


def watched(job_dir: Path, argv: list[str]) -> list[str]:
    """argv run under the exit watch (runners/exit_watch.py), whose pid becomes the job's: a trainer
    killed outright (out of memory) still leaves a status in job.json that says how it ended."""
    return [sys.executable, "-m", "orchestrator.runners.exit_watch", str(job_dir), "--", *argv]


def run_trainer(*args: str, stdin: str | None = None) -> str:
    """Run a trainer subcommand in the foreground (torch lives there) and return what it printed.
    When it fails, its last stderr line (the trainer's own `error: ...`) becomes a UserError."""
    proc = subprocess.run(trainer_argv(*args), cwd=PROJECT_ROOT, env=trainer_env(), input=stdin,
                          capture_output=True, text=True)
    if proc.returncode:
        lines = proc.stderr.strip().splitlines()
        raise UserError(lines[-1].removeprefix("error: ") if lines else f"trainer {args[0]} failed (exit {proc.returncode})")
    return proc.stdout


class LocalRunner:
    name = "local"

    def preflight(self, cfg, plan) -> None:
        return None  # this interpreter already runs; the trainer checks the rest

    def launch_spec(self, job_dir: Path) -> LaunchSpec:
        from orchestrator.launcher import job_launch_argv

        return LaunchSpec(
            # distributed.mode ddp/fsdp: the same command inside torch.distributed.run
            argv=watched(job_dir, job_launch_argv(job_dir, trainer_argv("train", str(job_dir)))),
            cwd=PROJECT_ROOT,
            env=trainer_env(),
            log_path=job_dir / LOG_FILE,
        )

    def start(self, spec: LaunchSpec) -> int:
        with open(spec.log_path, "ab") as log:
            # A new session: the job outlives this command and is stopped as a process group.
            proc = subprocess.Popen(
                spec.argv, cwd=spec.cwd, env=spec.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        return proc.pid

    def stop(self, job: dict) -> None:
        try:
            os.killpg(job["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
