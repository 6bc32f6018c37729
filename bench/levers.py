"""Each speed lever alone: one LoRA training step (forward, backward, optimizer) per configuration,
on the benchmark model and the same 1,280 positions, configurations interleaved round by round so a
busy machine slows them alike.

    .venv/bin/python -m bench.levers [--rounds 3]

Packed means 5 sequences of 256 tokens of rows packed end to end (block-diagonal mask); padded
means 8 rows of 64-256 tokens padded to the longest, as the Trainer baseline sees them.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

CONFIGS = {
    # name: (precision, base weights, chunked loss, packed, matmul attention, adapter inputs uncast[, compiled])
    "fp32, padded": ("fp32", "fp32", False, False, False, False),
    "fp32, packed": ("fp32", "fp32", False, True, False, False),
    "fp32, packed, chunked loss": ("fp32", "fp32", True, True, False, False),
    "bf16 autocast, padded": ("bf16", "fp32", False, False, False, False),
    "bf16 autocast, packed": ("bf16", "fp32", False, True, False, False),
    "bf16 autocast, packed, bf16 base weights": ("bf16", "bf16", False, True, False, False),
    "bf16 autocast, packed, bf16 base weights, chunked loss": ("bf16", "bf16", True, True, False, False),
    "+ matmul attention": ("bf16", "bf16", True, True, True, False),
    "+ matmul attention, adapter inputs uncast": ("bf16", "bf16", True, True, True, True),
    # The layers are compiled once, when this configuration first runs (its warm-up round pays the
    # compile); the other configurations of the same model then run with compiled code switched off,
    # and with layer 0's input requiring grad as compiling sets it (a few tenths of a percent more work).
    "+ torch.compile of the decoder layers": ("bf16", "bf16", True, True, True, True, True),
}


def _rows(n_rows: int, seed: int):
    rng = random.Random(seed)
    out = []
    for _ in range(n_rows):
        ids = [rng.randrange(2000) for _ in range(rng.randint(64, 256))]
        out.append((ids, list(ids)))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", nargs="*", default=None, help="configuration names to time")
    p.add_argument("--model", default=str(Path.home() / ".cache" / "llamafarm-bench" / "smollm2-135m-shape"))
    a = p.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model
    from peft.helpers import disable_input_dtype_casting
    from transformers import AutoModelForCausalLM

    from bench.model import build_model
    from trainer import attention
    from trainer.data.batching import collate
    from trainer.loop import _forward
    from contract.decisions import Decision
    from trainer.performance import choose_threads, use_compile

    choose_threads()
    folder = build_model(Path(a.model))
    rows = _rows(40, 0)
    padded = [[r] for r in rows[:8]]
    packed, at = [], 8
    for _ in range(5):  # fill 256-token sequences from the remaining rows
        seq, room = [], 256
        while at < len(rows) and len(rows[at][0]) <= room:
            seq.append(rows[at])
            room -= len(rows[at][0])
            at += 1
        if room > 0:
            seq.append((rows[at][0][:room], rows[at][1][:room]))
            at += 1
        packed.append(seq)
    batches = {True: collate(packed, 0, True), False: collate(padded, 0, False)}
    models = {}
    names = a.only or list(CONFIGS)
    for name in names:
        base = CONFIGS[name][1]
        if base not in models:
            dtype = torch.bfloat16 if base == "bf16" else torch.float32
            m = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
            m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
            for prm in m.parameters():
                if prm.requires_grad:
                    prm.data = prm.data.float()
            models[base] = (m, torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=3e-4))
    times = {n: [] for n in names}
    compiled_models = set()
    for r in range(a.rounds + 1):
        for name in names:
            precision, base, chunked, is_packed, matmul_attention, uncast, *compiled = CONFIGS[name]
            model, opt = models[base]
            # Once layers are compiled the attention stays registered as excluded from their graph.
            impl = attention.register(compiled=bool(compiled_models)) if matmul_attention else "sdpa"
            model.get_base_model().set_attn_implementation(impl)
            if compiled and base not in compiled_models:
                use_compile(model, Decision("on", "bench"))
                compiled_models.add(base)
            batch = batches[is_packed]
            start = time.perf_counter()
            stance = "default" if compiled else "force_eager"
            with disable_input_dtype_casting(model, active=uncast), torch.compiler.set_stance(stance):
                _forward(model, batch, "cpu", precision, chunked).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
                print(f"round {r}: {name}: {times[name][-1]:.2f} s", flush=True)
    print(f"\n{'configuration':58} {'s/step':>7} {'real tok/s':>10}")
    for name in names:
        s = statistics.median(times[name])
        print(f"{name:58} {s:7.2f} {batches[CONFIGS[name][3]].real_tokens / s:10.0f}")


if __name__ == "__main__":
    main()
