"""Where a job's training step goes: its first step's forward and backward, op by op, in one process.

    .venv/bin/python -m bench.step_profile JOB_DIR [--rounds 3]

JOB_DIR is a finished llamafarm job (e.g. a bench.matrix cell's home/jobs/...); a copy trains again with
every decision the job made and is measured at its first step (bench/job_step.py). On that step's
batches: forward and backward --rounds times untimed inside (the fastest counts), then once with every
aten operation timed (a TorchDispatchMode), then once with the calls into our C++ kernels timed (flash
attention, layer, softmax, dropout: they are not aten operations), then each matrix product the step ran
again alone, with its shapes and strides, fastest of 5. Printed: the step, the largest operations, our
kernels, the products inside the step against alone (inside a step their operands come from memory),
and what is left (Python, autograd, and the op timer's own cost, printed beside it).

Why not torch.profiler: under it the output layer's forward product read ~300 ms per 341-row chunk
against 89 ms timed directly in the same steps (docs/PERFORMANCE.md); a timer around each call adds
microseconds per call, and the step under it is printed beside the step without it.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from bench.job_step import at_first_step, check_job_dir

ALONE_REPEATS = 5  # timings of each product alone; the fastest counts
SHOWN = 12  # the largest operations printed
# Our kernels' entry points (trainer/*_kernel.py): class name -> methods that call into C++.
KERNELS = {"trainer.flash_kernel.FlashKernel": ("forward", "backward"),
           "trainer.layer_kernel.LayerKernel": ("rms_norm_forward", "rms_norm_backward", "swiglu_forward",
                                                "swiglu_backward", "rotary"),
           "trainer.softmax_kernel.SoftmaxKernel": ("softmax_", "exp_"),
           "trainer.dropout_kernel.DropoutKernel": ("apply",)}


def _op_timer():
    """A dispatch mode that adds up each aten operation's seconds and keeps each product's call."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    products = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                torch.ops.aten.baddbmm.default}

    class OpTimer(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seconds, self.calls, self.products = Counter(), Counter(), []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            start = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            took = time.perf_counter() - start
            self.seconds[str(func)] += took
            self.calls[str(func)] += 1
            if func in products:
                self.products.append((func, [_spec(a) for a in args], took))
            return out

    return OpTimer()


def _spec(arg):
    import torch

    return (tuple(arg.shape), arg.stride(), arg.dtype) if isinstance(arg, torch.Tensor) else arg


def _alone(func, specs) -> float:
    """Seconds of one product alone: fresh operands with the step's shapes, strides and dtypes, fastest of
    ALONE_REPEATS after a first call."""
    import torch

    from trainer.native import fastest_alternated

    def operand(spec):
        if not (isinstance(spec, tuple) and len(spec) == 3 and isinstance(spec[2], torch.dtype)):
            return spec
        shape, stride, dtype = spec
        size = 1 + sum((n - 1) * s for n, s in zip(shape, stride))
        return torch.randn(size).to(dtype).as_strided(shape, stride)

    args = [operand(s) for s in specs]
    return fastest_alternated({"product": lambda: func(*args)}, ALONE_REPEATS)["product"]


def _kernel_timer(seconds: Counter):
    """Our kernels' entry points wrapped to add their seconds into `seconds`; returns the undo."""
    import importlib

    undo = []
    for path, methods in KERNELS.items():
        module, name = path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        for method in methods:
            original = getattr(cls, method)

            def timed(*args, _original=original, _label=f"{name}.{method}", **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    seconds[_label] += time.perf_counter() - start

            setattr(cls, method, timed)
            undo.append((cls, method, original))
    return lambda: [setattr(cls, method, original) for cls, method, original in undo]


def profile(fit, batches: list, rounds: int) -> dict:
    """The step's forward and backward: plain (fastest of `rounds`), under the op timer, with our kernels
    timed; and its products alone."""
    from trainer.compile_probe import forward_backward_seconds

    trainable = [p for p in fit.model.parameters() if p.requires_grad]

    def step() -> float:
        return forward_backward_seconds(fit.model, fit.objective, batches, trainable)

    step()  # warm
    plain = [step() for _ in range(rounds)]
    ops = _op_timer()
    with ops:
        under_timer = step()
    kernels: Counter = Counter()
    undo = _kernel_timer(kernels)
    try:
        with_kernels_timed = step()
    finally:
        undo()
    return {"tokens": sum(b.real_tokens for b in batches), "plain": plain, "under_timer": under_timer,
            "with_kernels_timed": with_kernels_timed, "ops": ops.seconds, "calls": ops.calls,
            "products_in_step": sum(took for *_, took in ops.products),
            "products_alone": sum(_alone(func, specs) for func, specs, _ in ops.products),
            "products": len(ops.products), "kernels": kernels}


def report(m: dict) -> str:
    step = min(m["plain"])
    kernels = sum(m["kernels"].values())
    lines = [f"{m['tokens']} real tokens; forward and backward {step:.3f} s at best ({m['tokens'] / step:.0f} "
             f"tokens/s; rounds {', '.join(f'{s:.3f}' for s in m['plain'])}), {m['under_timer']:.3f} s under the op "
             f"timer, {m['with_kernels_timed']:.3f} s with our kernels timed",
             f"aten operations {sum(m['ops'].values()):.3f} s, the largest:"]
    lines += [f"  {name:40s} {1e3 * s:9.1f} ms  x{m['calls'][name]}" for name, s in m["ops"].most_common(SHOWN)]
    lines.append(f"our kernels {kernels:.3f} s ({100 * kernels / m['with_kernels_timed']:.0f}% of that step):")
    lines += [f"  {name:40s} {1e3 * s:9.1f} ms" for name, s in m["kernels"].most_common()]
    inside, alone = m["products_in_step"], m["products_alone"]
    lines.append(f"matrix products: {m['products']} calls, {inside:.3f} s in the step, {alone:.3f} s alone "
                 f"({inside / alone:.2f}x); {100 * inside / m['under_timer']:.0f}% of the step under the op timer")
    # The op timer's own cost (a Python call around each of thousands of operations) lands in what is left.
    rest = m["under_timer"] - sum(m["ops"].values()) - kernels
    lines.append(f"left (Python, autograd, the op timer's own {m['under_timer'] - step:.3f} s over "
                 f"{sum(m['calls'].values())} operations): {rest:.3f} s of the step under the op timer")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("job_dir", type=Path)
    p.add_argument("--rounds", type=int, default=3, help="untimed-inside runs of the step; the fastest counts")
    a = p.parse_args(argv)
    check_job_dir(p, a.job_dir)
    if a.rounds < 1:
        p.error(f"--rounds {a.rounds}: at least 1")
    measured, _ = at_first_step(a.job_dir, lambda fit, batches: profile(fit, batches, a.rounds))
    if measured is None:
        return 1
    print(report(measured))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
