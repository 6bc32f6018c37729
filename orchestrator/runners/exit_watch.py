"""The process a local job runs as (LocalRunner.start starts it; people don't):

    python -m orchestrator.runners.exit_watch JOB_DIR -- TRAINER_ARGV...

It runs the trainer's command (or the distributed launcher around it) as its child, in the job's process
group, and waits. Its pid is the job's pid, so a job is alive exactly while this process is. A trainer
that ends by itself writes its own status in job.json; one that is killed outright cannot (SIGKILL,
which the kernel's out-of-memory killer sends, cannot be caught), and without this process the job
would only read "ended without reporting a status". Here the exit code becomes the job's status and
error instead (orchestrator.runners.base.describe_exit), as the container runner's supervisor does
with the container's.

A stop is sent to the whole process group (LocalRunner.stop), so the trainer gets its SIGTERM directly;
this process only notes it (a job that then ends without a status was stopped, not failed) and
passes nothing on, so a launcher in between never sees the signal twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from contract.job_folder import SUPERVISED_ENV, end_unreported_run, read_job, run_number
from orchestrator.runners.base import describe_exit


def watch(job_dir: Path, argv: list[str]) -> int:
    """Run argv to its end; the job's status from its exit code when the trainer wrote none."""
    stopped = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
    run = run_number(read_job(job_dir))
    code = subprocess.run(argv, env={**os.environ, SUPERVISED_ENV: "1"}).returncode
    if stopped:
        end_unreported_run(job_dir, run, status="stopped")
    else:
        meaning = describe_exit(code)
        error = f"the training process ended with exit code {code}: {meaning}; see {job_dir / 'train.log'}"
        if end_unreported_run(job_dir, run, status="failed", error=error):
            print(f"exit watch: the training process ended with exit code {code} ({meaning}); job status: failed",
                  flush=True)
    return 128 - code if code < 0 else code  # a signal as shells report it


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m orchestrator.runners.exit_watch JOB_DIR -- TRAINER_ARGV...", file=sys.stderr)
        return 2
    return watch(Path(argv[0]), argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
