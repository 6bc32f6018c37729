"""A finished job's first training step, trained again in this process for a measurement (bench.segments_in_step,
bench.step_profile).

A copy of the job's folder in a temporary folder trains again, every decision made as the job made it, up
to its first step; the measurement runs there on the step's own batches, the step then completes and the
run stops; the copy is deleted. Why in one process: on a 2-core cloud machine a whole job's tokens/s moved
by up to a quarter between two runs of the same job, so comparing two jobs measures the draw of the
process more than the thing compared (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

# What the job wrote that a fresh training run of its copy must not find.
_OUTPUTS = ("final", "best", "exports", "checkpoint-*", "metrics.jsonl", "train.log")


def check_job_dir(parser, job_dir: Path) -> None:
    """Exit through `parser` (argparse) unless `job_dir` is a job's folder."""
    if not (job_dir / "job.json").is_file():
        parser.error(f"{job_dir} holds no job.json: give the folder of a llamafarm job")


def at_first_step(job_dir: Path, measure):
    """(what `measure(fit, batches)` returned at the copy's first step, the copy's log); `batches`: the
    step's batches, collated. Where the copy stopped before its first step: the log printed, and None."""
    from trainer import loop
    from trainer.entrypoint import run

    measured = []
    train_step = loop._Run.step

    def measured_step(self, group, real, window):
        measured.append(measure(self.fit, [self.fit.objective.collate(b) for b in group]))
        self.fit.hooks = dataclasses.replace(self.fit.hooks, stop_requested=lambda: True)  # this step, then stop
        return train_step(self, group, real, window)

    loop._Run.step = measured_step
    try:
        with tempfile.TemporaryDirectory(prefix="job-step-") as scratch:
            copy = Path(scratch) / job_dir.name
            shutil.copytree(job_dir, copy, ignore=shutil.ignore_patterns(*_OUTPUTS))
            log = StringIO()
            with redirect_stdout(log):
                run(copy)
    finally:
        loop._Run.step = train_step
    if not measured:
        print(log.getvalue())
        print("the copy stopped before its first step (its log is above)")
        return None, log.getvalue()
    return measured[0], log.getvalue()
