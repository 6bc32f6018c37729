"""A decoder layer's element-wise work as one C++ pass each, forward and backward (trainer/layer_kernel.cpp):
RMSNorm, SwiGLU (silu(gate) * up) and the rotary embedding.

With torch's operators each is several passes over the layer's activations, and autograd keeps their
intermediates: transformers' RMSNorm is a cast, a square, a mean, an rsqrt and two products (and their
backward), the MLP's silu(gate) is kept for the product's backward, the rotary embedding builds
rotate_half's concatenation of a negated half. On the 2-core Xeon here a 1,548-token step of the
SmolLM2-135M shape spent ~22 ms per layer in them (two norms 9 ms, SwiGLU 8, rotary 5, forward and
backward), ~0.65 s of a 5.6 s LoRA step. The kernel reads each input once and writes each output once,
keeps one float per row for the norm's backward, and rebuilds silu(gate) in the backward instead of
keeping it (one activation of the intermediate width less per layer).

Why our own code: Liger-Kernel and Unsloth fuse the same operations, in Triton, for GPUs only;
inductor fuses them when the layers are compiled, which pays only on long runs (trainer/compile_probe.py)
and is what compiled layers use instead (trainer/fused_layers.py hands over to torch's operators while
tracing). Built and loaded by trainer/native.py; without a compiler torch's operators stay.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from trainer.native import BuildFailed, fastest_ms, load_kernel

__all__ = ["BuildFailed", "LayerKernel", "load", "measure"]

SOURCE = Path(__file__).with_name("layer_kernel.cpp")

_P, _N, _F, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "rms_norm_forward": [_P, _P, _P, _P, _N, _N, _F, _I],
    "rms_norm_backward": [_P, _P, _P, _P, _P, _P, _N, _N, _I],
    "swiglu_forward": [_P, _P, _P, _N, _I],
    "swiglu_backward": [_P, _P, _P, _P, _P, _N, _I],
    "rotary": [_P, _P, _P, _P, _N, _N, _N, _I, _I],
}


def _pointer(tensor) -> int | None:
    return None if tensor is None else tensor.data_ptr()


class LayerKernel:
    """The built kernel's functions on contiguous CPU tensors of one dtype, bf16 or float32."""

    def __init__(self, library: ctypes.CDLL, path: Path, compiler: str):
        self.path, self.compiler = path, compiler
        self._functions = {}
        for name, argtypes in _SIGNATURES.items():
            for suffix in ("bf16", "f32"):
                function = getattr(library, f"{name}_{suffix}")
                function.argtypes, function.restype = argtypes, None
                self._functions[name, suffix] = function

    @staticmethod
    def takes(*tensors) -> bool:
        """Whether the kernel computes on these tensors: CPU, one dtype (bf16 or float32)."""
        import torch

        first = tensors[0]
        return (first.device.type == "cpu" and first.dtype in (torch.bfloat16, torch.float32)
                and all(t.device == first.device and t.dtype == first.dtype for t in tensors))

    def _call(self, name: str, dtype, *args) -> None:
        import torch

        suffix = "bf16" if dtype == torch.bfloat16 else "f32"
        self._functions[name, suffix](*args, torch.get_num_threads())

    def rms_norm_forward(self, x, weight, eps: float):
        """(y, rstd): x (rows, width) contiguous; rstd one float32 per row."""
        import torch

        y = torch.empty_like(x)
        rstd = torch.empty(x.shape[0], dtype=torch.float32)
        self._call("rms_norm_forward", x.dtype, x.data_ptr(), weight.data_ptr(), y.data_ptr(), rstd.data_ptr(),
                   x.shape[0], x.shape[1], eps)
        return y, rstd

    def rms_norm_backward(self, x, weight, rstd, dy, weight_grad: bool):
        """(dx, dw): dw float32, or None when weight_grad is False."""
        import torch

        dx = torch.empty_like(x)
        dw = torch.empty(x.shape[1], dtype=torch.float32) if weight_grad else None
        self._call("rms_norm_backward", x.dtype, x.data_ptr(), weight.data_ptr(), rstd.data_ptr(), dy.data_ptr(),
                   dx.data_ptr(), _pointer(dw), x.shape[0], x.shape[1])
        return dx, dw

    def swiglu_forward(self, gate, up):
        import torch

        out = torch.empty_like(gate)
        self._call("swiglu_forward", gate.dtype, gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel())
        return out

    def swiglu_backward(self, gate, up, grad):
        """(d gate, d up)."""
        import torch

        d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
        self._call("swiglu_backward", gate.dtype, gate.data_ptr(), up.data_ptr(), grad.data_ptr(), d_gate.data_ptr(),
                   d_up.data_ptr(), gate.numel())
        return d_gate, d_up

    def rotary(self, x, cos, sin, backward: bool = False):
        """x (rows, heads, dim), cos and sin (rows, dim), contiguous: x cos + rotate_half(x) sin per head, or
        with backward the transposed rotation (the gradient of that for x)."""
        import torch

        out = torch.empty_like(x)
        rows, heads, dim = x.shape
        self._call("rotary", x.dtype, x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), rows, heads, dim,
                   int(backward))
        return out


def load(compiler: str) -> LayerKernel:
    """The kernel built with `compiler` for this machine (once; later jobs load the cached build).
    BuildFailed says why not."""
    return load_kernel(LayerKernel, SOURCE, compiler)


def rms_norm(kernel: LayerKernel, x, weight, eps: float):
    """transformers' Llama RMSNorm (weight * normalised x) with autograd, over x's last dimension."""
    return _functions()["rms_norm"].apply(x, weight, eps, kernel)


def swiglu(kernel: LayerKernel, gate, up):
    """silu(gate) * up with autograd."""
    return _functions()["swiglu"].apply(gate, up, kernel)


def rotary(kernel: LayerKernel, x, cos, sin):
    """x * cos + rotate_half(x) * sin with autograd for x: x (B, heads, L, D) laid out as (B, L, heads, D)
    (the projection's output, transposed), cos and sin (B or 1, L, D); the result in x's layout."""
    return _functions()["rotary"].apply(x, cos, sin, kernel)


_FUNCTIONS: dict = {}


def _functions() -> dict:
    """The torch.autograd.Functions, defined on first use (importing this module needs no torch)."""
    if not _FUNCTIONS:
        _FUNCTIONS.update(_define())
    return _FUNCTIONS


def _define() -> dict:
    import torch

    class RmsNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, eps, kernel):
            rows = x.contiguous().view(-1, x.shape[-1])
            y, rstd = kernel.rms_norm_forward(rows, weight.contiguous(), eps)
            ctx.save_for_backward(rows, weight, rstd)
            ctx.kernel, ctx.shape = kernel, x.shape
            return y.view(x.shape)

        @staticmethod
        def backward(ctx, grad):
            rows, weight, rstd = ctx.saved_tensors
            dy = grad.contiguous().view(rows.shape)
            dx, dw = ctx.kernel.rms_norm_backward(rows, weight.contiguous(), rstd, dy, ctx.needs_input_grad[1])
            return dx.view(ctx.shape), None if dw is None else dw.to(weight.dtype), None, None

    class SwiGlu(torch.autograd.Function):
        @staticmethod
        def forward(ctx, gate, up, kernel):
            gate, up = gate.contiguous(), up.contiguous()
            ctx.save_for_backward(gate, up)
            ctx.kernel = kernel
            return kernel.swiglu_forward(gate, up)

        @staticmethod
        def backward(ctx, grad):
            gate, up = ctx.saved_tensors
            return (*ctx.kernel.swiglu_backward(gate, up, grad.contiguous()), None)

    def rotate(kernel, x, cos, sin, backward):
        b, heads, length, dim = x.shape
        rows = x.transpose(1, 2).reshape(b * length, heads, dim)  # a view for the projection's layout
        out = kernel.rotary(rows, cos.reshape(b * length, dim), sin.reshape(b * length, dim), backward)
        return out.view(b, length, heads, dim).transpose(1, 2)

    class Rotary(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, cos, sin, kernel):
            # (1, L, D) without position ids: one row of angles per batch row for the kernel (a small copy).
            cos, sin = (t.expand(x.shape[0], *t.shape[1:]).contiguous() for t in (cos, sin))
            ctx.save_for_backward(cos, sin)
            ctx.kernel = kernel
            return rotate(kernel, x, cos, sin, backward=False)

        @staticmethod
        def backward(ctx, grad):
            cos, sin = ctx.saved_tensors
            return rotate(ctx.kernel, grad, cos, sin, backward=True), None, None, None

    return {"rms_norm": RmsNorm, "swiglu": SwiGlu, "rotary": Rotary}


MEASURE_ROWS = 512  # tokens of the activations the decision times: a packed step's layers see at least this many
CACHE_KIND = "layer_kernel"  # contract/machine_cache.py


def measured_once(kernel: LayerKernel, config) -> tuple[dict, bool]:
    """(`measure`'s times, whether they were measured by an earlier job): the first job on this machine
    with the model's widths and this build of the kernel measures and keeps them; later jobs, and the
    other processes of a distributed job, read them, so they all decide alike (the kernel and torch's
    operators round differently, and AdamW's first steps carry such differences into the weights)."""
    from contract.decisions import head_shape
    from contract.machine_cache import kept_or_measured, machine_key

    heads, kv_heads, dim = head_shape(config)
    key = machine_key(kernel.path.name, f"hidden {config.hidden_size}, intermediate {config.intermediate_size}, "
                                        f"heads {heads}/{kv_heads} of {dim}")
    return kept_or_measured(CACHE_KIND, key, lambda: measure(kernel, config))


def measure(kernel: LayerKernel, config, rounds: int = 3) -> dict:
    """Milliseconds for one decoder layer's element-wise work at MEASURE_ROWS tokens in float32, forward and
    backward (two norms with frozen weights, SwiGLU, the rotary embedding of q and k), with this kernel and
    with the model's own operators, alternated `rounds` times; the fastest round of each."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, rotate_half

    from contract.decisions import head_shape

    hidden, inter = config.hidden_size, config.intermediate_size
    heads, kv_heads, dim = head_shape(config)
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape, grad=True):
        return torch.randn(*shape, generator=generator).requires_grad_(grad)

    x, norm = tensor(1, MEASURE_ROWS, hidden), LlamaRMSNorm(hidden, eps=1e-6).requires_grad_(False)
    gate, up = tensor(1, MEASURE_ROWS, inter), tensor(1, MEASURE_ROWS, inter)
    q = tensor(1, MEASURE_ROWS, heads, dim).transpose(1, 2)
    k = tensor(1, MEASURE_ROWS, kv_heads, dim).transpose(1, 2)
    cos, sin = tensor(1, MEASURE_ROWS, dim, grad=False), tensor(1, MEASURE_ROWS, dim, grad=False)

    def with_kernel():
        outs = [rms_norm(kernel, x, norm.weight, 1e-6), rms_norm(kernel, x, norm.weight, 1e-6), swiglu(kernel, gate, up),
                rotary(kernel, q, cos, sin), rotary(kernel, k, cos, sin)]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    def with_torch():
        angles = cos[:, None], sin[:, None]  # transformers' apply_rotary_pos_emb, which ours may stand in for
        rotated = [t * angles[0] + rotate_half(t) * angles[1] for t in (q, k)]
        outs = [norm(x), norm(x), torch.nn.functional.silu(gate) * up, *rotated]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    return fastest_ms({"kernel": with_kernel, "torch": with_torch}, rounds)
