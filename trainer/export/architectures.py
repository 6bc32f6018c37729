"""The model families export supports, and each one's special cases, in one place.

Everything common (tensor names, metadata keys) comes from gguf-py's own tables: the Hugging Face ->
GGUF tensor name map of the architecture (gguf.get_tensor_name_map) and GGUFWriter's keys. What is
left is what llama.cpp's graph for the architecture does differently from the transformers model,
read from llama.cpp's loader (src/models/<arch>.cpp of the pinned version) and its converter:

- llama (Llama, Mistral): llama.cpp rotates interleaved pairs, Hugging Face rotate-half: q/k rows are
  re-ordered per head. Its graph has no sliding window, so a model trained with one is exported only
  for contexts that fit inside it.
- qwen2, qwen3, phi3, gemma2: llama.cpp uses the rotate-half (NEOX) form too; no re-order.
- phi3: fused qkv_proj and gate_up_proj are written as they are (llama.cpp splits them at run time);
  llama.cpp switches Phi's sliding window off, so as for llama. llama.cpp strips the whitespace after
  Phi-3's control tokens (as Phi-3's tokenizer.json says, rstrip) only when general.name contains
  "phi3", so the name gets that tag when it lacks it.
- gemma2: Hugging Face keeps RMSNorm weights as w - 1 (it computes x * (1 + w)), llama.cpp as w; the
  soft-capping values and the sliding window are keys of their own; llama.cpp scales the embeddings by
  sqrt(hidden) itself, scales queries by 1/sqrt(head_dim) (so query_pre_attn_scalar must equal it) and
  alternates sliding and full attention starting with a sliding layer, as transformers does.
- qwen3moe: Qwen3's attention; every layer's MLP is a mixture of experts. The checkpoint's per-expert
  projections are stacked into one 3-D tensor each (ffn_gate_exps, ffn_up_exps, ffn_down_exps; see
  weights.py), the router (mlp.gate) is ffn_gate_inp and stays F32 (as llama.cpp's converter and
  quantizer keep it), and expert count, experts used per token and the expert width are keys.
  llama.cpp's graph always renormalises the chosen experts' weights and makes every layer sparse, so
  a config with norm_topk_prob false, mlp_only_layers or decoder_sparse_step > 1 is refused.

The trainer refuses an architecture not listed here before training (trainer/entrypoint.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import gguf

from contract.errors import UserError


def _no_keys(writer: gguf.GGUFWriter, config: dict) -> None:
    pass


def _gemma2_keys(writer: gguf.GGUFWriter, config: dict) -> None:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if config.get("query_pre_attn_scalar", head_dim) != head_dim:
        raise UserError(f"gemma2: query_pre_attn_scalar {config['query_pre_attn_scalar']} differs from head_dim {head_dim}; "
                        "llama.cpp scales queries by 1/sqrt(head_dim) for this size, so the export would differ")
    layers = config.get("layer_types") or []
    expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(config["num_hidden_layers"])]
    if layers and list(layers) != expected:
        raise UserError(f"gemma2: layer_types {layers} are not llama.cpp's pattern (sliding on even layers)")
    if config.get("attn_logit_softcapping") is not None:
        writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
    if config.get("final_logit_softcapping") is not None:
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    writer.add_sliding_window(int(config["sliding_window"]))


def _phi3_keys(writer: gguf.GGUFWriter, config: dict) -> None:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    original = rope.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
    if original:
        writer.add_rope_scaling_orig_ctx_len(int(original))


def _qwen3moe_keys(writer: gguf.GGUFWriter, config: dict) -> None:
    where = "qwen3_moe config.json"
    if not config.get("norm_topk_prob"):
        raise UserError(f"{where}: norm_topk_prob is false, but llama.cpp's qwen3moe graph always renormalises the "
                        "chosen experts' weights; the export would compute a different model")
    if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
        raise UserError(f"{where}: dense layers (mlp_only_layers {config.get('mlp_only_layers')}, decoder_sparse_step "
                        f"{config.get('decoder_sparse_step')}) are not in llama.cpp's qwen3moe graph, where every layer "
                        "is a mixture of experts")
    writer.add_expert_count(int(config.get("num_experts") or config["num_local_experts"]))
    writer.add_expert_used_count(int(config["num_experts_per_tok"]))
    writer.add_expert_feed_forward_length(int(config["moe_intermediate_size"]))


@dataclass(frozen=True)
class Architecture:
    family: str
    gguf_arch: gguf.MODEL_ARCH
    reorder_qk: bool = False
    """Hugging Face rotate-half -> llama.cpp interleaved pairs (q/k rows per head)."""
    norm_offset: float = 0.0
    """Added to every RMSNorm weight (Gemma stores w - 1)."""
    ignores_sliding_window: bool = False
    """llama.cpp's graph attends to the whole context: export only for contexts inside the window."""
    keys: Callable[[gguf.GGUFWriter, dict], None] = field(default=_no_keys)
    """Family metadata beyond the common keys."""
    name_tag: str = ""
    """Text general.name must contain: llama.cpp keys some tokenizer behaviour on the model's name."""
    keep_f32: tuple[str, ...] = ()
    """Ends of Hugging Face weight names written F32 whatever the type asked (a MoE router)."""

    def keeps_f32(self, hf_name: str) -> bool:
        return hf_name.endswith(self.keep_f32) if self.keep_f32 else False

    def gguf_name(self, name: str) -> str:
        return name if self.name_tag in name.lower() else f"{name}-{self.name_tag}"

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture("Llama", gguf.MODEL_ARCH.LLAMA, reorder_qk=True, ignores_sliding_window=True),
    "MistralForCausalLM": Architecture("Mistral", gguf.MODEL_ARCH.LLAMA, reorder_qk=True, ignores_sliding_window=True),
    "Qwen2ForCausalLM": Architecture("Qwen2 / Qwen2.5", gguf.MODEL_ARCH.QWEN2),
    "Qwen3ForCausalLM": Architecture("Qwen3", gguf.MODEL_ARCH.QWEN3),
    "Gemma2ForCausalLM": Architecture("Gemma 2", gguf.MODEL_ARCH.GEMMA2, norm_offset=1.0, keys=_gemma2_keys),
    "Phi3ForCausalLM": Architecture("Phi-3", gguf.MODEL_ARCH.PHI3, ignores_sliding_window=True, keys=_phi3_keys,
                                    name_tag="phi3"),
    "Qwen3MoeForCausalLM": Architecture("Qwen3-MoE", gguf.MODEL_ARCH.QWEN3MOE, keys=_qwen3moe_keys,
                                        keep_f32=(".mlp.gate.weight",)),
}


def architecture_of(config: dict) -> tuple[str, Architecture]:
    """(transformers class name, Architecture) of a model config; unsupported ones fail listing the supported."""
    archs = config.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return a, ARCHITECTURES[a]
    raise UserError(
        f"model architecture {', '.join(archs) or config.get('model_type')} is not supported (it cannot be exported "
        f"to GGUF and verified); supported: {', '.join(ARCHITECTURES)}"
    )


def sliding_window(config: dict) -> int | None:
    """The attention window the trained model uses, or None (transformers' Qwen2 keeps one it does not use)."""
    if config.get("use_sliding_window") is False:
        return None
    return config.get("sliding_window") or None
