"""The most any exact training step can gain over the baseline on a matrix cell, set by the matmuls alone.

    .venv/bin/python -m bench.ceiling --cells 1024x1:lora-qv-r8,2048x1:lora-qv-r8
    .venv/bin/python -m bench.ceiling --cells 512x4:full --rounds 2
    .venv/bin/python -m bench.ceiling --cells 1024x1:lora-qv-r8 --precision fp32   # every side in fp32

Every step that trains a cell's method exactly runs the linear layers' products (`products`): each
layer's forward; the input gradient of every layer the loss's gradient has to pass through (with LoRA,
all but the first layer's q, k and v projections, whose input comes from the frozen embedding); and with
full fine-tuning every weight gradient, the tied output layer's included. This times those products and
nothing else, in the cell's shapes (one packed step of LENGTH x BATCH tokens), in the faster of fp32 and
bf16 here (or --precision, which llamafarm's side then runs too), with torch's own matmul (MKL / oneDNN),
each shape's fastest of several repetitions; and runs the baseline script (bench/baseline.py, as
bench.matrix does) and llamafarm on the cell's rows in between, in one run: products, baseline, llamafarm,
products (--rounds 2: then llamafarm, baseline, products). The faster timing of the products is kept.

Printed per cell: the baseline's and llamafarm's real tokens/s, and two ceilings, each as tokens/s and
as a ratio to the baseline: the products alone (attention, norms, activations, the loss and the optimizer
free), and the products with the attention's causal FLOPs added at the products' own rate. A cell whose
first ceiling is under the matrix's target (bench.matrix TARGETS) cannot reach it with any kernel that
does not beat the machine's matmul library, however little the rest of the step costs. LoRA's own
adapter products (rank r, well under 1% of the FLOPs) are left out and every product is timed alone
with warm caches, so the ceilings are, if anything, too high (inside a training step the same products
took 1.2-1.3x as long on a 2-core Intel Xeon, their operands coming from memory: docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from bench import measure
from bench.cpu_lora import run_baseline, run_project
from bench.matrix import (PRECISION_CHOICES, TARGETS, TIMED_STEPS, alternation, baseline_flags, cell_rows, parse_cell,
                          pooled, row_lengths, timed_steps, write_strategy)
from bench.model import SHAPE, bench_model, method_settings, write_rows

CHUNK_TOKENS = 4096  # products over more tokens run as chunks (products)
REPEATS = 5  # timings of each product shape; the fastest counts


def products(config: dict, tokens: int, method: str) -> list[tuple[str, int, int, int, int]]:
    """(what, m, k, n, count): the m x k by k x n products one exact training step of `method` on
    `tokens` tokens runs in the model's linear layers and output layer, equal shapes grouped; over more
    than CHUNK_TOKENS tokens, as equal chunks of the tokens (how a step would run them: a 16k x 49k
    output is 3 GB)."""
    chunks = math.ceil(tokens / CHUNK_TOKENS)
    tokens = math.ceil(tokens / chunks)
    d, layers, inter, vocab = (config[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"))
    kv = d * config["num_key_value_heads"] // config["num_attention_heads"]
    full = method_settings(method)[0]["type"] == "full"
    # (name, in, out, products per step, input gradients per step): with LoRA the embedding is frozen,
    # so no gradient flows into the first layer's attention input, and its q, k, v need none.
    input_grads = layers if full else layers - 1
    weights = [("q,o", d, d, 2 * layers, layers + input_grads), ("k,v", d, kv, 2 * layers, 2 * input_grads),
               ("gate,up", d, inter, 2 * layers, 2 * layers), ("down", inter, d, layers, layers),
               ("output", d, vocab, 1, 1)]
    out = []
    for name, fan_in, fan_out, count, grads in weights:
        out.append((f"{name} forward", tokens, fan_in, fan_out, count * chunks))
        out.append((f"{name} input gradient", tokens, fan_out, fan_in, grads * chunks))
        if full:
            out.append((f"{name} weight gradient", fan_out, tokens, fan_in, count * chunks))
    return out


def flops(shapes: list[tuple[str, int, int, int, int]]) -> float:
    return sum(2 * m * k * n * count for _, m, k, n, count in shapes)


def time_products(shapes: list[tuple[str, int, int, int, int]], dtype) -> float:
    """Seconds for all of `shapes`: each shape's fastest of REPEATS timings, times its count. Into one
    output tensor: a fresh one per product would time its page faults too (the ceiling is the products' own
    cost)."""
    import torch

    total = 0.0
    for _, m, k, n, count in shapes:
        a, b, out = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype), torch.empty(m, n, dtype=dtype)
        torch.mm(a, b, out=out)
        best = math.inf
        for _ in range(REPEATS):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - start)
        total += best * count
    return total


def ceiling_cell(cell: str, work: Path, model: Path, tokenizer, precision: str, rounds: int, env: dict,
                 forced: str = "auto") -> dict:
    """One cell: the products timed, then the baseline and llamafarm on the cell's rows, then the products
    again (per round; the sides alternate between rounds); the ceilings from the faster products timing.
    `precision`: the products' and the baseline's; `forced`: llamafarm's setting (auto: its own decision)."""
    import torch

    length, batch, method = parse_cell(cell)
    folder = work / cell.replace(":", "-")
    folder.mkdir()
    steps = measure.WARMUP_STEPS + timed_steps(cell, TIMED_STEPS)
    rows = cell_rows(tokenizer, length, batch, steps)
    data = write_rows(rows, folder / "train.jsonl")
    strategy = write_strategy(folder, length, batch, method, steps, precision=forced)
    extra = baseline_flags(length, batch, method)
    sides = {"baseline": lambda: run_baseline(folder, model, data, None, precision, steps, env, extra=extra),
             "llamafarm": lambda: run_project(folder, model, data, None, env, strategy="bench_matrix",
                                              strategy_file=strategy)}
    shapes = products(SHAPE, length * batch, method)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    timings, runs = [time_products(shapes, dtype)], {side: [] for side in sides}
    for side in alternation(rounds, ("llamafarm",)):
        runs[side].append(sides[side]())
        if len(runs["baseline"]) == len(runs["llamafarm"]):
            timings.append(time_products(shapes, dtype))
    seconds = min(timings)
    tokens = length * batch
    lengths = row_lengths(tokenizer, rows, length)
    attention_seconds = measure.attention_flops(SHAPE, lengths) / sum(lengths) * tokens / (flops(shapes) / seconds)
    baseline, ours = (pooled(runs[side])["tokens_per_second"] for side in sides)
    result = {"cell": cell, "precision": precision, "baseline": baseline, "llamafarm": ours,
              "products_seconds": timings, "products_gflops": flops(shapes) / 1e9,
              "products_rate": flops(shapes) / seconds / 1e9,
              "ceiling": tokens / seconds, "ceiling_with_attention": tokens / (seconds + attention_seconds)}
    print(f"{cell}: baseline {baseline:.0f}, llamafarm {ours:.0f} real tokens/s ({ours / baseline:.2f}x); the "
          f"products of a {tokens}-token step ({result['products_gflops']:.0f} GFLOP, {precision}) take "
          f"{seconds:.2f} s at best ({result['products_rate']:.0f} GFLOP/s; timings "
          f"{', '.join(f'{t:.2f}' for t in timings)} s): ceiling {result['ceiling']:.0f} tokens/s "
          f"({result['ceiling'] / baseline:.2f}x), with the attention at their rate "
          f"{result['ceiling_with_attention']:.0f} ({result['ceiling_with_attention'] / baseline:.2f}x); "
          f"llamafarm at {100 * ours / result['ceiling_with_attention']:.0f}% of that", flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default="1024x1:lora-qv-r8", help="comma-separated LENGTHxBATCH:METHOD cells")
    p.add_argument("--rounds", type=int, default=1, help="runs per side and cell, alternated (B L, then L B)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="auto", help="auto: the faster "
                   "precision here for the products and the baseline, llamafarm deciding its own; fp32 or bf16: "
                   "every side in it")
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "llamafarm-bench"))
    a = p.parse_args(argv)
    cells = a.cells.split(",")
    for cell in cells:
        parse_cell(cell)
    if a.rounds < 1:
        sys.exit(f"--rounds {a.rounds}: at least 1")
    from transformers import AutoTokenizer

    work = Path(a.workdir).expanduser().resolve()
    run_dir = work / time.strftime("ceiling-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True)
    peaks = measure.matmul_peak(measure.peak_thread_counts())
    precision = measure.faster_precision(peaks) if a.precision == "auto" else a.precision
    print(f"machine: {measure.cpu_model()}, {len(os.sched_getaffinity(0))} cores; matmul peak {peaks} GFLOP/s; "
          f"products and baseline in {precision}{', llamafarm too' if a.precision != 'auto' else ''}", flush=True)
    model = bench_model("shape", work)
    tokenizer = AutoTokenizer.from_pretrained(model)
    results = [ceiling_cell(cell, run_dir, model, tokenizer, precision, a.rounds, dict(os.environ), a.precision)
               for cell in cells]
    (run_dir / "result.json").write_text(json.dumps({"peaks": peaks, "results": results}, indent=1))
    floor = TARGETS["full"]
    under = [r["cell"] for r in results if r["ceiling"] / r["baseline"] < floor]
    print(f"cells whose ceiling from the products alone is under the full matrix's {floor}x floor: "
          f"{', '.join(under) or 'none'}; result: {run_dir / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
