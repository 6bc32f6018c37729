"""The blockwise attention's masked softmax as one C++ pass per score row (trainer/softmax_kernel.cpp).

With torch's operators, each query block of the blockwise kernel (trainer/attention.py) adds the mask
to its scores, then runs torch's softmax (a max, an exponential, a sum and a division over the row),
and its backward recomputes both: together 11% of a batch-1 LoRA step at 1,024 tokens (torch.profiler,
docs/PERFORMANCE.md). This kernel adds the mask, takes the softmax and keeps each row's log-sum-exp
in one pass, so the backward recomputes the probabilities as exp(scores + mask - lse) in one more:
about 2x faster than torch's operators forward and 2.5x in the backward, the same values to bf16's
rounding.

Why our own code: no library has it. torch's fused `_masked_softmax` takes a boolean mask and ran
~10x slower than the two operators here; its CPU flash attention (scaled_dot_product_attention) ran
slower than our blockwise attention, and FlexAttention has no CPU backward (docs/PERFORMANCE.md);
inductor's fused softmax needs the layers compiled, which pays only on long runs. Built and loaded
by trainer/native.py; without a compiler the attention keeps torch's operators.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from trainer.native import BuildFailed, fastest_alternated, load_kernel

__all__ = ["BuildFailed", "SoftmaxKernel", "load", "measure"]

SOURCE = Path(__file__).with_name("softmax_kernel.cpp")


class SoftmaxKernel:
    """The built kernel. Scores (B*kv, rows*group, keys) contiguous, in bf16 or float32, are turned into
    probabilities in place; `mask` is the block's (B, 1, rows, 1, keys) additive mask in the same dtype."""

    def __init__(self, library: ctypes.CDLL, path: Path, compiler: str):
        self.path, self.compiler = path, compiler
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        self._functions = {}
        for name in ("masked_softmax", "masked_exp"):
            for suffix in ("bf16", "f32"):
                function = getattr(library, f"{name}_{suffix}")
                function.argtypes = [pointer, pointer, pointer] + [size] * 7 + [ctypes.c_int]
                function.restype = None
                self._functions[name, suffix] = function

    def softmax_(self, scores, mask, kv: int, group: int):
        """softmax(scores + mask) over the last dim, written over scores; returns each row's log-sum-exp
        (float32, one per score row), what `exp_` needs to recompute the probabilities."""
        import torch

        lse = torch.empty(scores.shape[0] * scores.shape[1], dtype=torch.float32)
        self._call("masked_softmax", scores, mask, lse, kv, group)
        return lse

    def exp_(self, scores, mask, lse, kv: int, group: int) -> None:
        """exp(scores + mask - lse) in place: the probabilities `softmax_` gave for the same scores."""
        self._call("masked_exp", scores, mask, lse, kv, group)

    def _call(self, name: str, scores, mask, lse, kv: int, group: int) -> None:
        import torch

        batch, _, rows, _, keys = mask.shape
        if not (scores.is_contiguous() and mask.stride(-1) == 1 and scores.dtype == mask.dtype
                and scores.shape == (batch * kv, rows * group, keys)):
            raise ValueError(f"scores {tuple(scores.shape)} {scores.dtype} and mask {tuple(mask.shape)} {mask.dtype} "
                             "do not match the kernel's layout")
        suffix = {torch.bfloat16: "bf16", torch.float32: "f32"}[scores.dtype]
        self._functions[name, suffix](scores.data_ptr(), mask.data_ptr(), lse.data_ptr(), batch, kv, rows, group,
                                      keys, mask.stride(0), mask.stride(2), torch.get_num_threads())


def load(compiler: str) -> SoftmaxKernel:
    """The kernel built with `compiler` for this machine (once; later jobs load the cached build).
    BuildFailed says why not."""
    return load_kernel(SoftmaxKernel, SOURCE, compiler)


CACHE_KIND = "attention_softmax"  # contract/machine_cache.py


def measured_once(kernel: SoftmaxKernel, dtype, kv: int, group: int, rows: int, keys: int) -> tuple[dict, bool]:
    """(`measure`'s times, whether an earlier job measured them): kept per machine, build of the kernel, dtype
    and block shape, so every later job decides alike (the kernel and torch's operators round differently)."""
    from contract.machine_cache import kept_or_measured, machine_key

    key = machine_key(kernel.path.name, str(dtype)[6:], f"kv {kv} group {group}", f"rows {rows} keys {keys}")
    return kept_or_measured(CACHE_KIND, key, lambda: measure(kernel, dtype, kv, group, rows, keys))


def measure(kernel: SoftmaxKernel, dtype, kv: int, group: int, rows: int, keys: int, rounds: int = 5) -> dict:
    """Nanoseconds per score of one query block's softmax work, forward and backward's recompute, with
    this kernel and with torch's operators (the mask added, then torch's softmax, twice), alternated
    `rounds` times on random scores under a causal mask; the fastest round of each."""
    import torch

    generator = torch.Generator().manual_seed(0)
    scores = (torch.randn(kv, rows * group, keys, generator=generator) * 3).to(dtype)
    mask = torch.zeros(1, 1, rows, 1, keys, dtype=dtype)
    visible = torch.arange(keys)[None, :] <= torch.arange(keys - rows, keys)[:, None]
    mask.view(rows, keys).masked_fill_(~visible, torch.finfo(dtype).min)

    def with_kernel():
        lse = kernel.softmax_(scores.clone(), mask, kv, group)
        kernel.exp_(scores.clone(), mask, lse, kv, group)

    def with_aten():
        for _ in range(2):
            x = scores.clone()
            x.view(1, kv, rows, group, keys).add_(mask)
            torch.softmax(x, dim=-1)

    timed = fastest_alternated({"fused": with_kernel, "aten": with_aten}, rounds)
    per_score = 1e9 / scores.numel()
    return {f"{name}_ns": round(seconds * per_score, 3) for name, seconds in timed.items()}
