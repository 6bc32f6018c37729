"""The attention_segments decision against a job's own step: forward and backward of the job's first
step, every batch through the kernel per sequence and through the blockwise kernel, alternated in one
process; median of --rounds each.

    .venv/bin/python -m bench.segments_in_step JOB_DIR [--rounds 8]

JOB_DIR is a finished llamafarm job (e.g. one under a bench.matrix cell's home/jobs/). A copy of it in a
temporary folder trains again (every decision made as the job made it), is measured at its first step,
then stops; the copy is deleted. Why in one process: on a 2-core cloud machine a whole job's tokens/s
moved by up to a quarter between two runs of the same job, so two jobs (one per kernel) measure the draw
of the process more than the kernel (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import tempfile
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

# What the job wrote that a fresh training run of its copy must not find.
_OUTPUTS = ("final", "best", "exports", "checkpoint-*", "metrics.jsonl", "train.log")
_WAYS = {"per sequence": 0, "blockwise": None}  # attention_segments.use_from: from length 0 on, never


def _alternate(fit, group: list, rounds: int) -> tuple[dict[str, list[float]], int]:
    """(seconds of forward and backward over the step's batches each way, alternated; the batches' real
    tokens). Gradients are dropped after each pass."""
    from trainer import attention_segments
    from trainer.compile_probe import forward_backward_seconds

    batches = [fit.objective.collate(b) for b in group]
    trainable = [p for p in fit.model.parameters() if p.requires_grad]
    timed: dict[str, list[float]] = {name: [] for name in _WAYS}
    names = list(_WAYS)
    for r in range(rounds + 1):  # round 0 warms both up and is not counted
        for name in names if r % 2 == 0 else names[::-1]:
            attention_segments.use_from(_WAYS[name])
            took = forward_backward_seconds(fit.model, fit.objective, batches, trainable)
            if r:
                timed[name].append(took)
    return timed, sum(b.real_tokens for b in batches)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("job_dir", type=Path)
    p.add_argument("--rounds", type=int, default=8)
    a = p.parse_args(argv)
    if not (a.job_dir / "job.json").is_file():
        p.error(f"{a.job_dir} holds no job.json: give the folder of a llamafarm job")

    from trainer import loop
    from trainer.entrypoint import run

    measured: list[tuple[dict[str, list[float]], int]] = []
    train_step = loop._Run.step

    def measured_step(self, group, real, window):
        measured.append(_alternate(self.fit, group, a.rounds))
        self.fit.hooks = dataclasses.replace(self.fit.hooks, stop_requested=lambda: True)  # this step, then stop
        return train_step(self, group, real, window)

    loop._Run.step = measured_step
    with tempfile.TemporaryDirectory(prefix="segments-in-step-") as scratch:
        copy = Path(scratch) / a.job_dir.name
        shutil.copytree(a.job_dir, copy, ignore=shutil.ignore_patterns(*_OUTPUTS))
        log = StringIO()
        with redirect_stdout(log):
            run(copy)
    if not measured:
        print(log.getvalue())
        print("the copy stopped before its first step (its log is above)")
        return 1
    decided = next((line for line in log.getvalue().splitlines() if line.startswith("attention segments:")), "")
    timed, tokens = measured[0]
    medians = {name: statistics.median(seconds) for name, seconds in timed.items()}
    for name, seconds in timed.items():
        print(f"{name}: median {medians[name]:.3f} s ({tokens / medians[name]:.0f} tokens/s), "
              f"rounds {', '.join(f'{s:.3f}' for s in seconds)}")
    print(f"{tokens} tokens in the step's batches; blockwise / per sequence: "
          f"{medians['blockwise'] / medians['per sequence']:.3f} (above 1: the kernel per sequence is faster)")
    print(f"the job's own decision: {decided or 'not in its log'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
