"""What the benchmark measures: matmul peak, model FLOPs per token, tokens/s after warm-up, eval loss."""

from __future__ import annotations

import os
import time
from pathlib import Path

from contract.platform import cpu_model  # noqa: F401  (the benchmarks report it as measure.cpu_model)

WARMUP_STEPS = 2  # the first steps pay for allocator growth and lazy initialisation


def cpu_flags() -> list[str]:
    """The CPU features that decide CPU training speed (which matmul kernels exist)."""
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def matmul_peak(thread_counts: list[int], seconds: float = 1.0) -> dict[str, float]:
    """GFLOP/s of the best matmul per dtype, over square and layer-shaped products and thread counts
    (on a busy machine one thread can beat two)."""
    import torch

    out = {}
    before = torch.get_num_threads()
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for threads, (m, k, n) in ((t, s) for t in thread_counts for s in ((1024, 1024, 1024), (1280, 576, 1536))):
            torch.set_num_threads(threads)
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            for _ in range(2):
                a @ b
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / 2:
                a @ b
                count += 1
            best = max(best, 2 * m * k * n * count / (time.perf_counter() - start) / 1e9)
        out[name] = round(best, 1)
    torch.set_num_threads(before)
    return out


def lora_flops(config: dict, lengths: list[int], weight_gradients: bool = False) -> float:
    """Model FLOPs for one LoRA training pass over rows of these lengths (real tokens only).

    Frozen weights need a forward and an input-gradient product (2 + 2 FLOPs per weight and token),
    no weight gradient (`weight_gradients`: full fine-tuning, 2 more); attention scores and values cost
    2 * 2 * d per key, three times for forward and backward, over a causal context that averages
    (n + 1) / 2 keys."""
    d, layers, inter, vocab = (config[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"))
    kv = d * config["num_key_value_heads"] // config["num_attention_heads"]
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * inter
    weights = layers * per_layer + vocab * d
    return (6 if weight_gradients else 4) * weights * sum(lengths) + attention_flops(config, lengths)


def attention_flops(config: dict, lengths: list[int]) -> float:
    """The causal attention's FLOPs for sequences of these lengths, forward and backward: scores and
    values cost 2 * 2 * d per key, three times, over a context that averages (n + 1) / 2 keys."""
    d, layers = config["hidden_size"], config["num_hidden_layers"]
    return 3 * 4 * d * layers * sum(n * (n + 1) / 2 for n in lengths)


def faster_precision(peaks: dict[str, float]) -> str:
    """The dtype whose matmul ran faster in matmul_peak: the baselines' precision (the harder one to beat)."""
    return "bf16" if peaks["bf16"] > peaks["fp32"] else "fp32"


def step_rates(step_seconds: list[float], step_tokens: list[int]) -> list[float]:
    """Tokens/s of each step after the warm-up ones."""
    return [t / s for t, s in zip(step_tokens, step_seconds)][WARMUP_STEPS:]


def peak_thread_counts() -> list[int]:
    """The thread counts matmul_peak tries: one per core this process may use, and one."""
    return sorted({len(os.sched_getaffinity(0)), 1})


def after_warmup(step_seconds: list[float], step_tokens: list[int]) -> tuple[float, int, float]:
    """(tokens/s, tokens, seconds) over the steps after the warm-up ones."""
    seconds = sum(step_seconds[WARMUP_STEPS:])
    tokens = sum(step_tokens[WARMUP_STEPS:])
    return tokens / max(seconds, 1e-9), tokens, seconds


def eval_loss(model, rows: list[list[int]]) -> float:
    """Mean next-token loss per predicted token over `rows` (every token a target), one row at a time."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in rows:
            x = torch.tensor([ids], device=model.device)
            loss = model(input_ids=x, labels=x).loss.float().item()
            total += loss * (len(ids) - 1)
            count += len(ids) - 1
    return total / max(count, 1)
