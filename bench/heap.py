"""The heap lever alone: one matrix cell's strategy trained with malloc keeping freed memory between
steps (the trainer's choice on CPU where its probe shows page faults cost: trainer/heap.py) and with
glibc's defaults, alternated round by round in one run.

    .venv/bin/python -m bench.heap --cell 512x1:full --steps 14 --rounds 2

The defaults side sets MALLOC_PERTURB_=0, glibc's own default (no fill byte): any MALLOC_* variable makes
the trainer leave malloc as it is, and this one changes nothing else. (Not MALLOC_TOP_PAD_ or the other
size tunables: setting any of them, even to its default value, stops glibc adapting its mmap threshold,
and a run then took 226 tokens/s against ~490 with the true defaults.) Printed per run: the heap decision
the trainer recorded, the median tokens/s of the steps after the warm-up ones, and the peak RSS.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from bench import measure
from bench.cpu_lora import run_project
from bench.matrix import prepare_cell

SIDES = {"kept": {}, "default": {"MALLOC_PERTURB_": "0"}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cell", default="512x1:full", help="LENGTHxBATCH:METHOD, as bench.matrix takes it")
    p.add_argument("--steps", type=int, default=14, help="optimizer steps per run")
    p.add_argument("--rounds", type=int, default=2, help="runs per side, alternated")
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "llamafarm-bench"))
    a = p.parse_args(argv)
    cell = prepare_cell(a.cell, a.workdir, "heap", a.steps)
    medians: dict[str, list[float]] = {side: [] for side in SIDES}
    for r in range(a.rounds):
        for side, env in SIDES.items():
            folder = cell.work / f"{side}-{r + 1}"
            folder.mkdir()
            run = run_project(folder, cell.model, cell.data, None, {**os.environ, **env}, strategy="bench_matrix",
                              strategy_file=cell.strategy)
            per_step = measure.step_rates(run["step_seconds"], run["step_tokens"])
            medians[side].append(statistics.median(per_step))
            print(f"round {r + 1}, {side}: heap {run['decisions']['heap']['value']}, median "
                  f"{medians[side][-1]:.0f} tokens/s over steps {measure.WARMUP_STEPS + 1}-{a.steps}, peak RSS "
                  f"{run['peak_rss_mb']:,.0f} MB", flush=True)
    kept, default = (statistics.median(medians[side]) for side in SIDES)
    print(f"{a.cell}: kept {' / '.join(f'{m:.0f}' for m in medians['kept'])}, default "
          f"{' / '.join(f'{m:.0f}' for m in medians['default'])} tokens/s: kept {kept / default:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
