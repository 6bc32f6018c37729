"""Causal attention per packed sequence with our C++ flash kernel (trainer/flash_kernel.cpp).

The attention_segments path (trainer/attention_segments.py) sends long packed sequences one at a time
through a causal attention kernel. torch's own CPU kernel (`scaled_dot_product_attention(is_causal=True)`)
computes a float32 layer at 60-140 GFLOP/s on the 2-core machines here, under half the rate of the same
machine's matrix products (250-300), and pays a call with its own thread team per sequence. This kernel
computes both products of each 64 x 128 tile in register-blocked loops over float32 (bf16 inputs are
widened once), keeps only the output and each row's log-sum-exp for backward, reads and writes the
model's (B, L, H, D) projections through their strides, and runs every sequence of a batch in one
autograd node. Where it is faster than torch's kernel is measured (`measure`), not assumed: the
sequence_kernel decision (trainer/performance.py).

Why our own code: torch's CPU flash kernel is the library kernel for this and is what it is measured
against; no CPU library ships a faster one for training (FlexAttention has no CPU backward; oneDNN's
graph API fuses inference attention only). Built and loaded by trainer/native.py.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from trainer.native import BuildFailed, fastest_ms, load_kernel

__all__ = ["BuildFailed", "FlashKernel", "attention", "load", "measure"]

SOURCE = Path(__file__).with_name("flash_kernel.cpp")
HEAD_DIMS = (64, 128)  # the widths the kernel is instantiated for


class FlashKernel:
    """The built kernel's forward and backward on (heads, n, D) views with the last dimension contiguous."""

    def __init__(self, library: ctypes.CDLL, path: Path, compiler: str):
        self.path, self.compiler = path, compiler
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        self._functions = {}
        for name, pointers in (("flash_forward", 5), ("flash_backward", 9)):
            for suffix in ("bf16", "f32"):
                function = getattr(library, f"{name}_{suffix}")
                function.argtypes = [pointer] * pointers + [size] * 4 + [pointer, ctypes.c_float, ctypes.c_int]
                function.restype = ctypes.c_int
                self._functions[name, suffix] = function

    @staticmethod
    def takes(query, key, value) -> bool:
        """Whether the kernel computes on these (B, heads, L, D) tensors."""
        import torch

        return (query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float32)
                and key.dtype == query.dtype and value.dtype == query.dtype and query.shape[-1] in HEAD_DIMS
                and query.shape[1] % key.shape[1] == 0
                and all(t.stride(-1) == 1 for t in (query, key, value)))

    def forward(self, q, k, v, out, lse, scale: float) -> None:
        """out (heads, n, D) = causal attention of q (heads, n, D) over k, v (kv_heads, n, D); lse (heads, n)
        float32 contiguous gets each row's log-sum-exp."""
        self._call("flash_forward", (q, k, v, out, lse), (q, k, v, out), q, k, scale)

    def backward(self, q, k, v, out, lse, grad, dq, dk, dv, scale: float) -> None:
        """dq, dk, dv (written over) for the upstream gradient `grad` of `forward`'s out."""
        self._call("flash_backward", (q, k, v, out, lse, grad, dq, dk, dv), (q, k, v, out, grad, dq, dk, dv), q, k,
                   scale)

    def _call(self, name: str, pointers, strided, q, k, scale: float) -> None:
        import torch

        strides = (ctypes.c_int64 * (2 * len(strided)))(*[s for t in strided for s in t.stride()[:2]])
        suffix = "bf16" if q.dtype == torch.bfloat16 else "f32"
        heads, n, dim = q.shape
        failed = self._functions[name, suffix](*(t.data_ptr() for t in pointers), heads, k.shape[0], n, dim,
                                               ctypes.addressof(strides), scale, torch.get_num_threads())
        if failed:
            raise ValueError(f"the flash kernel takes head widths {HEAD_DIMS}, not {dim}")


def load(compiler: str) -> FlashKernel:
    """The kernel built with `compiler` for this machine (once; later jobs load the cached build).
    BuildFailed says why not."""
    return load_kernel(FlashKernel, SOURCE, compiler)


def attention(kernel: FlashKernel, query, key, value, spans, scale: float):
    """query (B, H, L, D), key/value (B, KV, L, D), spans per row as attention_segments.spans_of gives them;
    returns (B, L, H, D), with autograd."""
    return _function().apply(query, key, value, spans, scale, kernel)


_defined = None


def _function():
    """The torch.autograd.Function, defined on first use (importing this module needs no torch)."""
    global _defined
    if _defined is None:
        _defined = _define()
    return _defined


def _define():
    import torch

    class SequenceAttention(torch.autograd.Function):
        """Every causal span of the batch through the kernel, written into one (B, L, H, D) output;
        padding spans (each position sees only itself) take their value. Keeps q, k, v, the output and
        each row's log-sum-exp for backward, as torch's flash kernel does."""

        @staticmethod
        def forward(ctx, query, key, value, spans, scale, kernel):
            b, heads, n, dim = query.shape
            group = heads // key.shape[1]
            out = torch.empty(b, n, heads, dim, dtype=query.dtype)
            heads_first = out.transpose(1, 2)
            lses = []
            for row, parts in enumerate(spans):
                for start, end, causal in parts:
                    if not causal:
                        heads_first[row, :, start:end] = value[row, :, start:end].repeat_interleave(group, dim=0)
                        continue
                    lse = torch.empty(heads, end - start, dtype=torch.float32)
                    kernel.forward(query[row, :, start:end], key[row, :, start:end], value[row, :, start:end],
                                   heads_first[row, :, start:end], lse, scale)
                    lses.append(lse)
            ctx.save_for_backward(query, key, value, out)
            ctx.spans, ctx.scale, ctx.kernel, ctx.lses = spans, scale, kernel, lses
            return out

        @staticmethod
        def backward(ctx, grad):
            query, key, value, out = ctx.saved_tensors
            b, heads, n, dim = query.shape
            kv = key.shape[1]
            # Gradients in the projections' (B, L, heads, D) layout, handed back as (B, heads, L, D) views.
            dq = torch.empty(b, n, heads, dim, dtype=query.dtype).transpose(1, 2)
            dk = torch.empty(b, n, kv, dim, dtype=key.dtype).transpose(1, 2)
            dv = torch.empty(b, n, kv, dim, dtype=value.dtype).transpose(1, 2)
            grad = grad.transpose(1, 2)
            heads_first = out.transpose(1, 2)
            lses = iter(ctx.lses)
            for row, parts in enumerate(ctx.spans):
                for start, end, causal in parts:
                    span = slice(start, end)
                    if not causal:  # out = value repeated over the group: its gradient sums the group's
                        dq[row, :, span] = 0
                        dk[row, :, span] = 0
                        dv[row, :, span] = grad[row, :, span].unflatten(0, (kv, heads // kv)).sum(1)
                        continue
                    ctx.kernel.backward(query[row, :, span], key[row, :, span], value[row, :, span],
                                        heads_first[row, :, span], next(lses), grad[row, :, span], dq[row, :, span],
                                        dk[row, :, span], dv[row, :, span], ctx.scale)
            return dq, dk, dv, None, None, None

    return SequenceAttention


def measure(kernel: FlashKernel, heads: int, kv_heads: int, dim: int, dtype, length: int, rounds: int = 3) -> dict:
    """Milliseconds for one layer's attention forward and backward over one causal sequence of `length`
    tokens, with this kernel and with torch's kernel (as attention_segments runs it), alternated `rounds`
    times; the fastest round of each."""
    import torch

    from trainer import attention_segments

    q, k, v, grad = attention_segments.random_inputs(1, length, heads, kv_heads, dim, dtype,
                                                     torch.Generator().manual_seed(0))
    spans = [[(0, length, True)]]
    scale = dim ** -0.5

    def ours():
        attention(kernel, q, k, v, spans, scale).backward(grad)

    def torchs():
        attention_segments.torch_attention(q, k, v, spans, scale, dtype).backward(grad)

    return fastest_ms({"flash": ours, "sdpa": torchs}, rounds)


CACHE_KIND = "flash_kernel"  # contract/machine_cache.py
MEASURE_LENGTH = 1024  # tokens of the one sequence `measure` times, or the job's max_seq_length when shorter


def measured_once(kernel: FlashKernel, config, compute, max_len: int) -> tuple[dict, bool]:
    """(`measure`'s times, whether an earlier job measured them): kept per machine, build of the kernel,
    head shape, dtype and length, so later jobs and every process of a distributed job decide alike."""
    from contract.decisions import head_shape
    from contract.machine_cache import kept_or_measured, machine_key

    heads, kv_heads, dim = head_shape(config)
    length = min(max_len, MEASURE_LENGTH)
    key = machine_key(kernel.path.name, f"heads {heads}/{kv_heads} of {dim}", str(compute)[6:], f"length {length}")
    return kept_or_measured(CACHE_KIND, key, lambda: {
        "length": length, **measure(kernel, heads, kv_heads, dim, compute, length)})
