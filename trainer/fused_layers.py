"""Which of a model's modules take our layer kernel (trainer/layer_kernel.py), and handing them over.

Per model family (transformers' model_type), the RMSNorm and MLP classes and the modeling module whose
`apply_rotary_pos_emb` compute exactly what Llama's do (`weight * x / rms(x)`, `down(silu(gate) * up)`,
`x * cos + rotate_half(x) * sin`); tests/test_layer_kernel.py checks each family's tiny model against its
own forward and gradients. Gemma's norm scales by (1 + weight) and Phi-3 fuses gate and up and rotates part
of each head, so they keep torch's operators where they differ.

Each module keeps its own forward for anything the kernel does not take (another device or dtype, a
weight of another dtype than its input, a compiled layer being traced: inductor fuses these operations
itself), so the same model evaluates, generates and compiles as before.
"""

from __future__ import annotations

import importlib
import types
from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyLayers:
    norm: str
    """The RMSNorm class."""
    mlp: str | None
    """The gated MLP class (None: not Llama's)."""
    rotary: str | None
    """The modeling module whose apply_rotary_pos_emb is Llama's (None: not)."""


FAMILIES = {
    "llama": FamilyLayers("LlamaRMSNorm", "LlamaMLP", "llama"),
    "mistral": FamilyLayers("MistralRMSNorm", "MistralMLP", "mistral"),
    "qwen2": FamilyLayers("Qwen2RMSNorm", "Qwen2MLP", "qwen2"),
    "qwen3": FamilyLayers("Qwen3RMSNorm", "Qwen3MLP", "qwen3"),
    "qwen3_moe": FamilyLayers("Qwen3MoeRMSNorm", None, "qwen3_moe"),  # experts are not Llama's MLP
    "phi3": FamilyLayers("Phi3RMSNorm", None, None),  # gate_up_proj fused; partial rotary
}
_SILU = ("silu", "swish")

_kernel = None  # the rotary embedding's kernel for this process (None: the model's own function)
_rotary_originals: dict = {}  # modeling module name -> its own apply_rotary_pos_emb


def family_layers(config) -> FamilyLayers | None:
    return FAMILIES.get(getattr(config, "model_type", None))


def use_fused_layers(model, kernel) -> int:
    """Give the model's norms, MLPs and rotary embedding the kernel (None: their own operators again);
    returns how many modules were handed over."""
    from trainer.chunked_loss import causal_lm

    global _kernel
    config = causal_lm(model).config
    layers = family_layers(config)
    if layers is None:
        return 0
    silu = getattr(config, "hidden_act", None) in _SILU
    count = 0
    for module in model.modules():
        kind = type(module).__name__
        if kind == layers.norm:
            _hand_over(module, _fused_norm, kernel)
            count += 1
        elif kind == layers.mlp and silu:
            _hand_over(module, _fused_mlp, kernel)
            count += 1
    if layers.rotary:
        _kernel = kernel  # None: an installed apply_rotary_pos_emb calls the model's own
        if kernel is not None:
            _install_rotary(layers.rotary)
    return count


def _hand_over(module, forward, kernel) -> None:
    if kernel is None:
        module.__dict__.pop("forward", None)  # the class's own forward again
    else:
        module._layer_kernel = kernel
        module.forward = types.MethodType(forward, module)


def _traced() -> bool:
    import torch

    return torch.compiler.is_compiling()


def _fused_norm(self, hidden_states):
    from trainer.layer_kernel import rms_norm

    if _traced() or not self._layer_kernel.takes(hidden_states, self.weight):
        return type(self).forward(self, hidden_states)
    return rms_norm(self._layer_kernel, hidden_states, self.weight, self.variance_epsilon)


def _fused_mlp(self, x):
    from trainer.layer_kernel import swiglu

    gate, up = self.gate_proj(x), self.up_proj(x)
    if _traced() or not self._layer_kernel.takes(gate, up):
        return self.down_proj(self.act_fn(gate) * up)
    return self.down_proj(swiglu(self._layer_kernel, gate, up))


def _install_rotary(family: str) -> None:
    """The family's modeling module calls its module-level apply_rotary_pos_emb; ours takes its place
    once per process and calls the original for whatever the kernel does not take."""
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    if module.__name__ in _rotary_originals:
        return
    original = module.apply_rotary_pos_emb
    _rotary_originals[module.__name__] = original

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if (_kernel is None or unsqueeze_dim != 1 or _traced() or not _rotary_takes(q, k, cos, sin)):
            return original(q, k, cos, sin, unsqueeze_dim)
        from trainer.layer_kernel import rotary

        return rotary(_kernel, q, cos, sin), rotary(_kernel, k, cos, sin)

    module.apply_rotary_pos_emb = apply_rotary_pos_emb


def _rotary_takes(q, k, cos, sin) -> bool:
    """(B, heads, L, D) q and k of one length and an even head size, constant (B or 1, L, D) angles."""
    b, _, length, dim = q.shape
    return (not dim % 2 and k.shape[0] == b and k.shape[2:] == q.shape[2:] and not cos.requires_grad
            and not sin.requires_grad and cos.shape == sin.shape and cos.dim() == 3
            and cos.shape[0] in (1, b) and cos.shape[1:] == (length, dim) and _kernel.takes(q, k, cos, sin))


def torch_rotary(q, k, cos, sin):
    """transformers' own rotary embedding (Llama's), whether or not ours has taken its place."""
    from transformers.models.llama import modeling_llama

    original = _rotary_originals.get(modeling_llama.__name__, modeling_llama.apply_rotary_pos_emb)
    return original(q, k, cos, sin)
