"""Attention kernels for packed CPU batches, one layer's forward and backward on SmolLM2-135M's attention
shape (9 query heads over 3 KV heads, head dim 64): transformers' sdpa with the block-diagonal mask,
trainer/attention.py's grouped matmuls and its blockwise kernel, with torch's softmax and with ours
(trainer/softmax_kernel.py, "blockwise-fused"; built with the machine's C++ compiler), torch's causal
kernel once per packed sequence (trainer/attention_segments.py, "segments") and our flash kernel once per
packed sequence (trainer/flash_kernel.py, "flash"), interleaved round by round so a busy machine slows
them alike; the median per cell, and what each keeps for backward.

    .venv/bin/python -m bench.attention [--quick] [--rounds 3] [--rows 64-256|quarter|full]

Each batch row is a sequence of max_seq_length positions filled with rows of 64-256 tokens packed end to
end (the benchmark's rows, bench/model.py), with --rows quarter rows of a quarter of max_seq_length to all
of it (bench.matrix's rows), or with --rows full one row filling it (no packed rows to skip).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from bench.model import MAX_TOKENS, MIN_TOKENS

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
KERNELS = ("sdpa", "grouped-matmul", "blockwise", "blockwise-fused", "segments", "flash")
FULL = {"fp32": [(b, n) for b in (1, 4, 8) for n in (256, 512, 1024, 2048)],
        "bf16": [(b, n) for b in (1, 4, 8) for n in (256, 512, 1024, 2048)]}
# bf16 matmuls are emulated on CPUs without AVX512-BF16 or AMX (~1 GFLOP/s against ~90 for fp32): there
# the bf16 cells are cut to these (--all-bf16 runs them all).
EMULATED_BF16 = [(1, 256), (1, 512), (1, 1024), (4, 256), (4, 512)]
QUICK = {"fp32": [(1, 256), (4, 512), (4, 1024)], "bf16": [(1, 256), (4, 512)]}


def packed_mask(batch: int, n: int, rows: str, seed: int = 0):
    """A (batch, 1, n, n) additive mask as trainer/data/batching.py builds it for packed sequences."""
    import torch

    from trainer.data.batching import collate

    rng = random.Random(seed)
    sequences = []
    for _ in range(batch):
        seq, room = [], n
        while room:
            shortest, longest = {"64-256": (MIN_TOKENS, MAX_TOKENS), "quarter": (n // 4, n), "full": (n, n)}[rows]
            length = min(room, rng.randint(shortest, longest))
            seq.append(([1] * length, [1] * length))
            room -= length
        sequences.append(seq)
    return collate(sequences, 0, block_mask=True, mask_dtype=torch.float32).attention_mask


def run_kernel(kernel: str, query, key, value, mask, grad, softmax=None, flash=None):
    """One forward and backward; returns the bytes the forward saved for backward. `softmax`: our
    softmax kernel, which "blockwise-fused" runs with; `flash`: our flash kernel, which "flash" runs."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from trainer import attention, attention_segments

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = HEADS // KV_HEADS, True
    function = {"sdpa": sdpa_attention_forward, "grouped-matmul": attention.grouped_matmul_attention,
                "blockwise": attention.blockwise_attention, "blockwise-fused": attention.blockwise_attention,
                "segments": attention.blockwise_attention, "flash": attention.blockwise_attention}[kernel]
    attention.use_softmax_kernel(softmax if kernel == "blockwise-fused" else None)
    # Every batch per sequence, or none.
    attention_segments.use_from(1 if kernel in ("segments", "flash") else None)
    attention_segments.use_flash_kernel(flash if kernel == "flash" else None)
    saved = {}

    def pack(t):  # a storage saved twice, or as slices (segments: each sequence's q, k, v), counts once
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = function(module, query, key, value, mask)
    out.backward(grad)
    inputs = {t.untyped_storage().data_ptr() for t in (query, key, value)}
    return sum(size for ptr, size in saved.items() if ptr not in inputs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few cells, to check the script")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rows", default="64-256", choices=["64-256", "quarter", "full"])
    p.add_argument("--precision", nargs="*", default=["fp32", "bf16"])
    p.add_argument("--lengths", nargs="*", type=int, help="only these max_seq_lengths")
    p.add_argument("--all-bf16", action="store_true", help="every bf16 cell even where bf16 is emulated")
    a = p.parse_args(argv)

    import torch

    from contract.decisions import cpu_has_bf16
    from trainer import flash_kernel, softmax_kernel
    from trainer.performance import cpp_compiler, choose_threads

    choose_threads()
    if not cpp_compiler():
        raise SystemExit("bench.attention: no C++ compiler (g++, clang++ or $CXX) on PATH to build the softmax "
                         "and flash kernels with; install one (Debian: apt-get install g++)")
    try:
        softmax, flash = softmax_kernel.load(cpp_compiler()), flash_kernel.load(cpp_compiler())
    except softmax_kernel.BuildFailed as error:
        raise SystemExit(f"bench.attention: {error}") from None
    cells = QUICK if a.quick else dict(FULL)
    if not a.quick and not a.all_bf16 and not cpu_has_bf16():
        cells["bf16"] = EMULATED_BF16
    print(f"rows {a.rows}; per layer, forward + backward, median of {a.rounds} interleaved rounds; "
          "MB: kept for backward besides the inputs q, k, v (blockwise: its own pre-scaled copy of q, "
          "which a model keeps instead of q)")
    print(f"{'precision':9} {'batch':>5} {'length':>6} " + " ".join(f"{k + ' s':>16}" for k in KERNELS)
          + " " + " ".join(f"{k + ' MB':>18}" for k in KERNELS[1:]))
    for precision in a.precision:
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        for batch, n in cells[precision]:
            if a.lengths and n not in a.lengths:
                continue
            torch.manual_seed(0)
            mask = packed_mask(batch, n, a.rows)
            query = torch.randn(batch, HEADS, n, HEAD_DIM, dtype=dtype, requires_grad=True)
            key = torch.randn(batch, KV_HEADS, n, HEAD_DIM, dtype=dtype, requires_grad=True)
            value = torch.randn(batch, KV_HEADS, n, HEAD_DIM, dtype=dtype, requires_grad=True)
            grad = torch.randn(batch, n, HEADS, HEAD_DIM, dtype=dtype)
            times, saved = {k: [] for k in KERNELS}, {}
            for r in range(a.rounds + 1):  # round 0 warms up (and cuts the mask into blocks once)
                for kernel in KERNELS:
                    start = time.perf_counter()
                    saved[kernel] = run_kernel(kernel, query, key, value, mask, grad, softmax, flash)
                    if r:
                        times[kernel].append(time.perf_counter() - start)
            print(f"{precision:9} {batch:5} {n:6} "
                  + " ".join(f"{statistics.median(times[k]):16.3f}" for k in KERNELS)
                  + " " + " ".join(f"{saved[k] / 2**20:18.1f}" for k in KERNELS[1:]), flush=True)


if __name__ == "__main__":
    main()
