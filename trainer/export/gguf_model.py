"""A Hugging Face checkpoint of a supported family as a GGUF file, streamed one tensor at a time.

Runs without torch: weights come from safetensors memory maps (trainer/export/safetensors_io.py),
a LoRA adapter is merged into each weight as it passes (weights.py), and each tensor is converted,
quantized and written before the next is read. The header (metadata and every tensor's type and
size) is written first, which is why each tensor's output type is decided up front.

Tensor names and keys come from gguf-py; each family's special cases (q/k re-order, norm offsets,
extra keys, sliding windows) live in architectures.py. A tied lm_head is left out (llama.cpp reuses
token_embd). 1-D tensors stay F32. A mixture of experts' per-expert weights arrive stacked (weights.py)
and are written as 3-D tensors; rows are the last dimension, as for 2-D ones.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import gguf
import numpy as np

from contract.errors import UserError
from contract.export_options import IN_PROCESS_QUANTIZATIONS
from trainer.export.architectures import ARCHITECTURES, Architecture, architecture_of, sliding_window
from trainer.export.gguf_vocab import add_vocab, read_vocab
from trainer.export.weights import ModelWeights

Q = gguf.GGMLQuantizationType
# The training template's stop strings (JSON list), for `generate` on the GGUF.
STOP_STRINGS_KEY = "llamafarm.stop_strings"

# In-process types (numpy, gguf.quants) and the GGUF file type each stands for.
IN_PROCESS = {name: (Q[name.upper()], gguf.LlamaFileType[file_type])
              for name, file_type in IN_PROCESS_QUANTIZATIONS.items()}

def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face's rotate-half layout to llama.cpp's interleaved pairs, per head (rows of q/k or lora_b)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class Shape:
    arch: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    tied: bool
    config: dict = field(repr=False)
    spec: Architecture = field(repr=False, default=ARCHITECTURES["LlamaForCausalLM"])

    @classmethod
    def from_config(cls, config: dict) -> "Shape":
        _, spec = architecture_of(config)
        heads = config["num_attention_heads"]
        return cls(spec.name, config["num_hidden_layers"], config["hidden_size"], heads,
                   config.get("num_key_value_heads") or heads,
                   config.get("head_dim") or config["hidden_size"] // heads, config["vocab_size"],
                   bool(config.get("tie_word_embeddings", False)), config, spec)

    @cached_property
    def _names(self):
        # gguf-py's own Hugging Face -> GGUF tensor name table for the architecture.
        return gguf.get_tensor_name_map(self.spec.gguf_arch, self.n_layers)

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF tensor name of a Hugging Face tensor (None: not exported, e.g. rotary caches)."""
        if hf_name.endswith("rotary_emb.inv_freq"):
            return None
        name = self._names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"tensor {hf_name} has no GGUF counterpart in the {self.arch} layout; this model cannot be exported")
        return name

    def rope(self) -> dict:
        # transformers 5 keeps rope settings in rope_parameters; older configs in rope_theta/rope_scaling.
        params = dict(self.config.get("rope_parameters") or self.config.get("rope_scaling") or {})
        params.setdefault("rope_theta", self.config.get("rope_theta", 10000.0))
        params.setdefault("rope_type", params.get("type", "default"))
        return params

    def transform(self, hf_name: str, w: np.ndarray) -> np.ndarray:
        if self.spec.reorder_qk:
            if ".self_attn.q_proj." in hf_name:
                return permute_qk(w, self.n_heads)
            if ".self_attn.k_proj." in hf_name:
                return permute_qk(w, self.n_kv_heads)
        if self.spec.norm_offset and w.ndim == 1 and hf_name.endswith("norm.weight"):
            return w + np.float32(self.spec.norm_offset)
        return w

    def context_length(self, max_len: int) -> int:
        """The context llama.cpp may use: inside the sliding window where llama.cpp's graph has none."""
        trained = self.config.get("max_position_embeddings", max_len)
        window = sliding_window(self.config)
        if not (self.spec.ignores_sliding_window and window):
            return trained
        if max_len > window:
            raise UserError(
                f"{self.spec.family} trained with a sliding attention window of {window} tokens, which llama.cpp's "
                f"{self.arch} graph does not have; the export's context ({max_len}, training_args.max_seq_length) "
                "must fit inside the window, or the GGUF would attend differently"
            )
        return min(trained, window)


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """Per-frequency scaling of Llama 3.1+ ("llama3" rope type), written as the rope_freqs tensor."""
    base, factor = rope["rope_theta"], rope["factor"]
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    factors = np.where(wavelen < old_ctx / high, 1.0,
                       np.where(wavelen > old_ctx / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


def add_metadata(writer: gguf.GGUFWriter, shape: Shape, name: str, file_type: int, max_len: int) -> np.ndarray | None:
    c = shape.config
    writer.add_name(shape.spec.gguf_name(name))
    writer.add_context_length(shape.context_length(max_len))
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.n_layers)
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(shape.n_heads)
    writer.add_head_count_kv(shape.n_kv_heads)
    writer.add_layer_norm_rms_eps(c.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(shape.vocab_size)
    writer.add_rope_dimension_count(int(shape.head_dim * c.get("partial_rotary_factor", 1.0)))
    if shape.head_dim != shape.hidden // shape.n_heads:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    rope = shape.rope()
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_file_type(file_type)
    shape.spec.keys(writer, c)
    kind = rope["rope_type"]
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "llama3":
        return llama3_rope_factors(rope, shape.head_dim)
    elif kind != "default":
        raise UserError(f"rope scaling {kind!r} is not supported by the GGUF exporter (default, linear and llama3 are)")
    return None


def tensor_type(name: str, shape: tuple[int, ...], wanted: Q) -> Q:
    """The GGUF type a tensor is written in: 1-D stays F32; rows that don't fill whole blocks get F16."""
    if len(shape) == 1 or wanted == Q.F32:
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else Q.F16


def nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    return math.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype))


@dataclass
class ConvertResult:
    path: Path
    seconds: float
    tensor_types: dict[str, int]
    parameters: int


def convert(weights: ModelWeights, tokenizer_dir: Path, out: Path, quantization: str, name: str,
            chat_template: str | None, max_len: int = 2048, progress=None, stop_strings: tuple[str, ...] = ()) -> ConvertResult:
    """Write `weights` as a GGUF at `out` in one of the in-process types (f32 f16 bf16 q8_0 q4_0)."""
    start = time.perf_counter()
    if quantization not in IN_PROCESS:
        raise ValueError(quantization)
    wanted, file_type = IN_PROCESS[quantization]
    shape = Shape.from_config(weights.config)
    vocab = read_vocab(tokenizer_dir, shape.vocab_size)
    writer = gguf.GGUFWriter(out, shape.arch)
    rope_factors = add_metadata(writer, shape, name, file_type, max_len)
    add_vocab(writer, vocab, chat_template)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string(STOP_STRINGS_KEY, json.dumps(list(stop_strings)))

    plan: list[tuple[str | None, str, tuple[int, ...], Q]] = []  # (hf name, gguf name, shape, type)
    for hf_name in weights.names():
        target = shape.gguf_name(hf_name)
        if target is None or (target == "output.weight" and shape.tied):
            continue
        t_shape = weights.shape(hf_name)
        qtype = Q.F32 if shape.spec.keeps_f32(hf_name) else tensor_type(target, t_shape, wanted)
        plan.append((hf_name, target, t_shape, qtype))
    if rope_factors is not None:
        plan.append((None, "rope_freqs.weight", rope_factors.shape, Q.F32))
    for _, target, t_shape, qtype in plan:
        writer.add_tensor_info(target, t_shape, np.float32, nbytes(t_shape, qtype), raw_dtype=qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    counts: dict[str, int] = {}
    params = 0
    for i, (hf_name, target, t_shape, qtype) in enumerate(plan):
        data = rope_factors if hf_name is None else shape.transform(hf_name, weights.float32(hf_name))
        params += data.size
        writer.write_tensor_data(gguf.quants.quantize(np.ascontiguousarray(data), qtype))
        counts[qtype.name.lower()] = counts.get(qtype.name.lower(), 0) + 1
        if progress:
            progress(i + 1, len(plan))
    writer.close()
    return ConvertResult(out, time.perf_counter() - start, counts, params)
