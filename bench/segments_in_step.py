"""The attention_segments decision against a job's own step: forward and backward of the job's first
step, every batch through the kernel per sequence and through the blockwise kernel, alternated in one
process; median of --rounds each.

    .venv/bin/python -m bench.segments_in_step JOB_DIR [--rounds 8]

JOB_DIR is a finished llamafarm job (e.g. one under a bench.matrix cell's home/jobs/); a copy of it trains
again and is measured at its first step (bench/job_step.py says how, and why in one process).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from bench.job_step import at_first_step, check_job_dir

_WAYS = {"per sequence": 0, "blockwise": None}  # attention_segments.use_from: from length 0 on, never


def _alternate(fit, batches: list, rounds: int) -> tuple[dict[str, list[float]], int]:
    """(seconds of forward and backward over the step's batches each way, alternated; the batches' real
    tokens). Gradients are dropped after each pass."""
    from trainer import attention_segments
    from trainer.compile_probe import forward_backward_seconds

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
    check_job_dir(p, a.job_dir)
    measured, log = at_first_step(a.job_dir, lambda fit, batches: _alternate(fit, batches, a.rounds))
    if measured is None:
        return 1
    decided = next((line for line in log.splitlines() if line.startswith("attention segments:")), "")
    timed, tokens = measured
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
