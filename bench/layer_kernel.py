"""The layer kernel alone: training steps of the benchmark model with each decoder layer's RMSNorm,
SwiGLU and rotary embedding computed by our C++ kernel (trainer/layer_kernel.py) and by the model's own
operators, alternated round by round in one process on the same packed batches, so a busy machine
slows both sides alike.

    .venv/bin/python -m bench.layer_kernel --method lora-qv-r8 --length 512 --batch 4 --rounds 4
    .venv/bin/python -m bench.layer_kernel --method full --precision bf16

Each round trains the same 3 batches on each side (forward with the trainer's chunked loss and blockwise
or grouped-matmul attention as it would choose them, backward, AdamW's fused step); the first round warms
up. Printed: each round's seconds per side, then the median of each and their ratio.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

STEPS_PER_ROUND = 3


def _batches(length: int, batch: int, seed: int):
    """Packed batches of rows of length/4 to length tokens (the matrix's cells' mix), best fit."""
    from trainer.data.batching import collate

    rng = random.Random(seed)
    out = []
    for _ in range(STEPS_PER_ROUND):
        sequences = []
        for _ in range(batch):
            sequence, room = [], length
            while room >= length // 4:
                ids = [rng.randrange(2000) for _ in range(min(rng.randint(length // 4, length), room))]
                sequence.append((ids, list(ids)))
                room -= len(ids)
            sequences.append(sequence)
        out.append(collate(sequences, 0, True))
    return out


def _model(folder: Path, method: str, precision: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from bench.model import method_settings
    from trainer import performance

    settings, _ = method_settings(method)
    lora = settings["type"] == "lora"
    dtype = torch.bfloat16 if lora and precision == "bf16" else torch.float32  # frozen weights as the trainer stores them
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    if lora:
        model = get_peft_model(model, LoraConfig(r=settings["r"], lora_alpha=settings["alpha"],
                                                 lora_dropout=settings["dropout"],
                                                 target_modules=settings["target_modules"]))
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
        if settings["dropout"]:
            performance.use_lora_dropout(model, performance.choose_lora_dropout(
                "lora", settings["dropout"], "cpu", model.config.hidden_size))
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="lora-qv-r8", help="a bench/model.py METHODS name")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--model", default=str(Path.home() / ".cache" / "llamafarm-bench" / "smollm2-135m-shape"))
    a = p.parse_args(argv)

    import torch

    from bench.model import build_model
    from contract.decisions import choose_attention
    from contract.platform import cpp_compiler
    from trainer import heap, layer_kernel, performance
    from trainer.fused_layers import use_fused_layers
    from trainer.loop import _forward

    print(performance.use_threads(performance.choose_threads()).reason)
    heap.keep_freed_memory("cpu")
    model = _model(build_model(Path(a.model)), a.method, a.precision)
    attention = choose_attention("cpu", model.config, a.batch, a.length, a.precision)
    performance.use_attention(model, attention)
    performance.use_attention_softmax(performance.choose_attention_softmax(
        attention.value, model.config, a.precision, a.length))
    compiler = cpp_compiler()
    if not compiler:
        raise SystemExit("no C++ compiler (g++, clang++ or $CXX) on PATH to build the layer kernel with")
    kernel = layer_kernel.load(compiler)
    decision = performance.choose_layer_kernel(model, "cpu")
    print(f"the trainer would decide: {decision.value} ({decision.reason})")
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5, fused=True)
    batches = _batches(a.length, a.batch, 0)
    tokens = sum(b.real_tokens for b in batches)
    times: dict[str, list[float]] = {"kernel": [], "torch": []}
    for r in range(a.rounds + 1):
        for side in ("kernel", "torch") if r % 2 else ("torch", "kernel"):
            use_fused_layers(model, kernel if side == "kernel" else None)
            start = time.perf_counter()
            for batch in batches:
                _forward(model, batch, "cpu", a.precision, True).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if r:  # round 0 warms up
                times[side].append(time.perf_counter() - start)
                print(f"round {r}, {side}: {times[side][-1]:.2f} s ({tokens / times[side][-1]:.0f} tokens/s)", flush=True)
    ours, theirs = (statistics.median(times[side]) for side in ("kernel", "torch"))
    print(f"{a.method} {a.length}x{a.batch} {a.precision}: kernel {tokens / ours:.0f} tokens/s, torch's operators "
          f"{tokens / theirs:.0f}: {theirs / ours:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
