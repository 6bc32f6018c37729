"""MFU of the project's step on one matrix cell, eager or compiled: the cell's strategy trained for
--steps optimizer steps per run, each run between two measurements of the machine's matmul peak.

    .venv/bin/python -m bench.mfu --cell 512x4:lora-qv-r8 --steps 16 --rounds 3
    .venv/bin/python -m bench.mfu --cell 512x4:lora-qv-r8 --steps 40 --compile    # the compiled step

Per run: the median tokens/s of the steps after the warm-up ones (bench.measure.WARMUP_STEPS) times the
model FLOPs per token of the cell's rows (bench.measure.lora_flops, as bench.matrix counts them), over the
higher of the two peaks around the run (bench.measure.matmul_peak, the faster dtype), so a slow spell
of the machine during one peak measurement cannot inflate the figure. The median over rounds is the
result; every run's figures are printed, since this machine's speed moves over minutes. Eager is
`training_args.torch_compile: false`; --compile sets it true (needs a C++ compiler), and its first
steps, which compile, fall in the warm-up only with enough --steps: the median is taken anyway.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from bench import measure
from bench.cpu_lora import run_project
from bench.matrix import cell_flops_per_token, prepare_cell
from bench.model import BENCH_MODELS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cell", default="512x4:lora-qv-r8", help="LENGTHxBATCH:METHOD, as bench.matrix takes it")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    p.add_argument("--rounds", type=int, default=3, help="runs, each between two peak measurements")
    p.add_argument("--compile", action="store_true", help="torch_compile: true instead of false")
    p.add_argument("--model", choices=BENCH_MODELS, default="shape", help="bench/model.py BENCH_MODELS")
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "llamafarm-bench"))
    a = p.parse_args(argv)
    cell = prepare_cell(a.cell, a.workdir, "mfu", a.steps, a.model)
    flops_per_token = cell_flops_per_token(cell.tokenizer, cell.rows, cell.length, cell.method)
    threads = measure.peak_thread_counts()
    compiled = "true" if a.compile else "false"
    mfus = []
    for r in range(a.rounds):
        before = max(measure.matmul_peak(threads).values())
        folder = cell.work / f"run-{r + 1}"
        folder.mkdir()
        run = run_project(folder, cell.model, cell.data, None, dict(os.environ),
                          sets=(f"training_args.torch_compile={compiled}",), strategy="bench_matrix",
                          strategy_file=cell.strategy)
        after = max(measure.matmul_peak(threads).values())
        per_step = measure.step_rates(run["step_seconds"], run["step_tokens"])
        tokens_per_second = statistics.median(per_step)
        mfus.append(tokens_per_second * flops_per_token / (max(before, after) * 1e9))
        decisions = {k: run["decisions"][k]["value"]
                     for k in ("precision", "attention", "attention_softmax", "sequence_kernel", "attention_segments",
                               "compile", "threads")}
        print(f"run {r + 1}: median {tokens_per_second:.0f} tokens/s over steps {measure.WARMUP_STEPS + 1}-{a.steps} "
              f"({min(per_step):.0f}-{max(per_step):.0f}); peak {before:.0f} before, {after:.0f} after; "
              f"MFU {100 * mfus[-1]:.1f}%; {decisions}", flush=True)
    print(f"{a.cell} {'compiled' if a.compile else 'eager'}: MFU {' / '.join(f'{100 * m:.1f}%' for m in mfus)}, "
          f"median {100 * statistics.median(mfus):.1f}% ({flops_per_token / 1e9:.3f} GFLOP per token)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
