"""LoRA dropout with a fast mask on CPU: our C++ kernel where one builds (trainer/dropout_kernel.py), else numpy's.

PEFT's LoRA dropout is torch's nn.Dropout. On CPU its mask comes from torch's one mt19937 stream, one
draw per element on one thread: 4-6 ms for one 2048 x 576 activation here, and a LoRA step on all seven
projections draws 7 per layer, which was 30% of the step at dropout 0.05 (torch.profiler on the
matrix's 512x4 LoRA all-linear cell; docs/PERFORMANCE.md). This module draws the same Bernoulli mask
from numpy's PCG64 generator in 16-bit lanes (about 1 ms), seeded on every call from torch's generator,
so the strategy's seed, checkpoints and resume govern it exactly as they govern torch's own dropout.

The drop probability is p to within 1/65536 (a relative error under 1e-4 at p 0.05) and kept values
are scaled by 1 / (1 - p), torch's own value in the input's dtype. numpy is used because torch has no faster CPU
generator. Where a C++ compiler builds trainer/dropout_kernel.cpp (the `lora_dropout` decision "kernel"),
that kernel draws and multiplies in one pass instead (9-14x faster again, on torch's threads) and keeps
no mask for backward; its generator differs from numpy's, so the two give different masks.
"""

from __future__ import annotations

import numpy as np
import torch

LANES = 1 << 16  # one uint16 per element


class FastDropout(torch.nn.Module):
    """nn.Dropout's semantics (training only, the kept values scaled by the inverse keep probability,
    the scaled mask in the input's dtype as torch's own) with numpy's PCG64 mask."""

    def __init__(self, p: float, kernel=None) -> None:
        super().__init__()
        self.p, self.kernel = p, kernel
        self.threshold = round(p * LANES)  # lanes below it are dropped
        self.scale = 1 / (1 - p)  # torch's own scale; the drop rate is p to within 1/65536

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # in a compiled layer inductor draws the mask inside its fused kernel
            return torch.nn.functional.dropout(x, self.p, self.training)
        if not self.training or self.threshold == 0:
            return x
        seed = int(torch.randint(0, 2**62, (1,)))  # from torch's generator: resume restores the stream
        if self.kernel is not None and self.kernel.takes(x):
            from trainer.dropout_kernel import dropout

            return dropout(self.kernel, x, seed, self.p)
        lanes = np.frombuffer(np.random.Generator(np.random.PCG64(seed)).bytes(2 * x.numel()), dtype=np.uint16)
        # The scaled mask built as the bit patterns of 0 and `scale` in x's dtype: numpy's integer ops are
        # vectorised where torch's bool ops (where, bool-to-float casts) cost as much again as the product.
        ints = _SAME_SIZE_INT[x.itemsize]
        scale_bits = torch.tensor(self.scale, dtype=x.dtype).view(ints[0]).item()
        mask = (lanes >= self.threshold).astype(ints[1]) * ints[1](scale_bits)
        return x * torch.from_numpy(mask).view(x.dtype).view(x.shape).to(x.device)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# Signed integers (torch, numpy) of each float size: a positive scale's bit pattern fits either sign.
_SAME_SIZE_INT = {2: (torch.int16, np.int16), 4: (torch.int32, np.int32), 8: (torch.int64, np.int64)}


def use_fast_dropout(model, kernel=None) -> int:
    """Replace every LoRA layer's nn.Dropout with FastDropout of the same p (drawing with `kernel`, our
    C++ dropout kernel, where given); returns how many."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                dropouts[name] = FastDropout(dropout.p, kernel)
                replaced += 1
    return replaced
