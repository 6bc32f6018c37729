"""LoRA dropout as one C++ pass that draws the mask and multiplies (trainer/dropout_kernel.cpp).

PEFT's LoRA dropout is torch's nn.Dropout, whose CPU mask takes one draw per element from one
mt19937 stream on one thread; our numpy mask (trainer/lora_dropout.py) is ~4x faster but still draws,
converts and multiplies in three single-threaded passes: 3.5 ms for a 1668 x 576 activation and
9.5 ms for 1668 x 1536 on the 2-core Xeon here, 0.9 s of a 512x4 all-linear LoRA step (seven
dropouts a layer). This kernel draws each element's mask from a counter-based generator
(SplitMix64 of the element's index) and multiplies in the same pass, on torch's threads, and the
backward draws the same mask again instead of keeping it: no mask in memory between forward and
backward (one float per element of every adapted layer's input in PEFT's dropout).

Why our own code: torch's CPU generators are sequential streams (one draw after another), numpy's
fastest still needs its bytes converted and multiplied in separate passes, and inductor's fused
dropout needs the layers compiled, which pays only on long runs. Built and loaded by
trainer/native.py; without a compiler the numpy mask stays.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from trainer.native import BuildFailed, fastest_ms, load_kernel

__all__ = ["BuildFailed", "DropoutKernel", "load"]

SOURCE = Path(__file__).with_name("dropout_kernel.cpp")
_DRAWS = 1 << 32  # an element is kept when its 32-bit draw is at or above round(p * 2^32)


class DropoutKernel:
    """The built kernel: x * mask for a contiguous bf16 or float32 CPU tensor, the mask a function of
    the seed and each element's index."""

    def __init__(self, library: ctypes.CDLL, path: Path, compiler: str):
        self.path, self.compiler = path, compiler
        self._functions = {}
        for suffix in ("bf16", "f32"):
            function = getattr(library, f"dropout_{suffix}")
            function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64,
                                 ctypes.c_uint32, ctypes.c_float, ctypes.c_int]
            function.restype = None
            self._functions[suffix] = function

    @staticmethod
    def takes(x) -> bool:
        import torch

        return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32)

    def apply(self, x, seed: int, p: float):
        """x * mask, a new tensor: each element kept with probability 1 - p and scaled by 1 / (1 - p)
        rounded to x's dtype (torch's own scale), else 0."""
        import torch

        x = x.contiguous()
        out = torch.empty_like(x)
        threshold = min(round(p * _DRAWS), _DRAWS - 1)
        scale = torch.tensor(1 / (1 - p), dtype=x.dtype).item()
        suffix = "bf16" if x.dtype == torch.bfloat16 else "f32"
        self._functions[suffix](x.data_ptr(), out.data_ptr(), x.numel(), seed, threshold, scale,
                                torch.get_num_threads())
        return out


def dropout(kernel: DropoutKernel, x, seed: int, p: float):
    """The kernel's dropout with autograd: the backward multiplies the gradient by the same mask,
    drawn again from the seed."""
    return _function().apply(x, kernel, seed, p)


def load(compiler: str) -> DropoutKernel:
    """The kernel built with `compiler` for this machine (once; later jobs load the cached build).
    BuildFailed says why not."""
    return load_kernel(DropoutKernel, SOURCE, compiler)


_FUNCTION = None


def _function():
    global _FUNCTION
    if _FUNCTION is None:
        import torch

        class KernelDropout(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, kernel, seed, p):
                ctx.kernel, ctx.seed, ctx.p = kernel, seed, p
                return kernel.apply(x, seed, p)

            @staticmethod
            def backward(ctx, grad):
                return ctx.kernel.apply(grad, ctx.seed, ctx.p), None, None, None

        _FUNCTION = KernelDropout
    return _FUNCTION


MEASURE_ROWS = 512  # rows of the activation the decision times: a packed step's tokens pass in blocks of at least this
CACHE_KIND = "lora_dropout"  # contract/machine_cache.py


def measured_once(kernel: DropoutKernel, p: float, width: int) -> tuple[dict, bool]:
    """(`measure`'s times, whether an earlier job measured them): kept per machine, build of the kernel, p
    and width, so every later job decides alike (the kernel and numpy draw different masks: two jobs of one
    strategy that decided apart on a busy machine trained different weights)."""
    from contract.machine_cache import kept_or_measured, machine_key

    return kept_or_measured(CACHE_KIND, machine_key(kernel.path.name, f"p {p}", f"width {width}"),
                            lambda: measure(kernel, p, width))


def measure(kernel: DropoutKernel, p: float, width: int, rounds: int = 3) -> dict:
    """Milliseconds to drop out one float32 (MEASURE_ROWS x width) activation with this kernel and with
    numpy's mask (trainer/lora_dropout.py), alternated `rounds` times; the fastest round of each."""
    import torch

    from trainer.lora_dropout import FastDropout

    x = torch.randn(MEASURE_ROWS, width, generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()  # the seeds drawn here must not move the training's stream
    with_numpy = FastDropout(p)

    timed = fastest_ms({"kernel": lambda: kernel.apply(x, 0, p), "numpy": lambda: with_numpy(x)}, rounds)
    torch.set_rng_state(state)
    return timed
