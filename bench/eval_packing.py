"""Evaluation with packed rows against padded rows, in one process: trainer.loop.evaluate_loss both ways
on the same rows, alternated, fastest of --rounds each, with both losses.

    .venv/bin/python -m bench.eval_packing --length 512 --batch 4 --rows 48

The rows are LENGTH/4 to LENGTH random tokens on the SmolLM2-135M-shaped model with LoRA r 8 on q,v, in
the faster of fp32 and bf16 here; the attention kernel is the one a job with that batch and length
decides (contract/decisions.py choose_attention). Padded is one row per sequence under a padding mask
(transformers' sdpa), packed is evaluate_loss's pack_to: rows end to end up to LENGTH under the
block-diagonal mask, through our kernel.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from bench import measure
from bench.model import bench_model


def _rows(length: int, count: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        ids = [rng.randrange(100, 49000) for _ in range(rng.randint(length // 4, length))]
        rows.append((ids, ids))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "llamafarm-bench"))
    a = p.parse_args(argv)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from contract.decisions import choose_attention
    from trainer import loop, performance

    precision = measure.faster_precision(measure.matmul_peak(measure.peak_thread_counts()))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(bench_model("shape", Path(a.workdir)), dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    attention = choose_attention("cpu", model.config, a.batch, a.length, precision)
    performance.use_attention(model, attention)
    rows = _rows(a.length, a.rows)
    tokens = sum(len(ids) for ids, _ in rows)
    seconds: dict[str, list[float]] = {"padded": [], "packed": []}
    for r in range(a.rounds):
        ways = [("padded", None), ("packed", a.length)]
        for name, pack_to in ways if r % 2 == 0 else ways[::-1]:
            start = time.perf_counter()
            loss = loop.evaluate_loss(model, rows, a.batch, 0, "cpu", precision, True, pack_to)
            seconds[name].append(time.perf_counter() - start)
            print(f"round {r + 1} {name}: {seconds[name][-1]:.2f} s, loss {loss:.5f}", flush=True)
    padded, packed = min(seconds["padded"]), min(seconds["packed"])
    print(f"{a.length} x {a.batch}, {a.rows} rows ({tokens} tokens), {precision}, attention {attention.value}: "
          f"padded {padded:.2f} s ({tokens / padded:.0f} tokens/s), packed {packed:.2f} s "
          f"({tokens / packed:.0f} tokens/s): {padded / packed:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
