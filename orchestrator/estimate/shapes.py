"""A base model's shape without loading its weights: from a local config.json, the Hugging Face
cache, the builtin specs, or a bundled table of the shipped strategies' models."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from contract.errors import UserError
from contract.strategy import BaseModelSpec


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tied_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in one decoder layer, by module name."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_dim
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values()) + 2 * self.hidden_size

    @property
    def params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        return embed * (1 if self.tied_embeddings else 2) + self.num_layers * self.layer_params + self.hidden_size

    @property
    def matmul_params(self) -> int:
        """Parameters used in a matrix product per token: every linear layer and the output head."""
        return self.num_layers * (self.layer_params - 2 * self.hidden_size) + self.vocab_size * self.hidden_size


# The shipped strategies' hub models, from their published config.json files.
KNOWN: dict[str, ModelShape] = {
    "meta-llama/Llama-3.2-3B": ModelShape(128256, 3072, 8192, 28, 24, 8, True),
    "meta-llama/Llama-3.1-8B": ModelShape(128256, 4096, 14336, 32, 32, 8, False),
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": ModelShape(32000, 2048, 5632, 22, 32, 4, False),
}


def _from_config(config: dict) -> ModelShape:
    try:
        return ModelShape(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
    except KeyError as exc:
        raise UserError(f"the model's config.json has no {exc.args[0]!r}; cannot estimate its size") from None


def _from_gguf(found) -> ModelShape:
    arch, meta = found
    heads = meta[f"{arch}.attention.head_count"]
    return ModelShape(
        vocab_size=meta["tokenizer.ggml.tokens"], hidden_size=meta[f"{arch}.embedding_length"],
        intermediate_size=meta[f"{arch}.feed_forward_length"], num_layers=meta[f"{arch}.block_count"],
        num_heads=heads, num_kv_heads=meta.get(f"{arch}.attention.head_count_kv", heads),
        tied_embeddings=meta["tied_embeddings"],
    )


def shape_for(spec: BaseModelSpec) -> tuple[ModelShape, str]:
    """The shape and where it came from."""
    from inputs.models import builtin

    model_id = spec.huggingface_id
    if builtin.is_builtin(model_id):
        b = builtin.get_spec(model_id)
        return ModelShape(b.vocab_size, b.hidden_size, b.intermediate_size, b.num_hidden_layers,
                          b.num_attention_heads, b.num_key_value_heads, b.tie_word_embeddings), "builtin spec"
    from inputs.models import gguf

    if gguf.is_gguf_source(model_id):
        return _from_gguf(gguf.inspect(gguf.source_file(model_id))), "the GGUF file's metadata"
    local = Path(model_id).expanduser()
    if (local / "config.json").is_file():
        return _from_config(json.loads((local / "config.json").read_text())), f"{local / 'config.json'}"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_id, "config.json", revision=spec.revision)
    except Exception:  # an id that is not a valid repo name is simply not cached
        cached = None
    if isinstance(cached, str):
        return _from_config(json.loads(Path(cached).read_text())), "the Hugging Face cache"
    if model_id in KNOWN:
        return KNOWN[model_id], "llamafarm's table of shipped models"
    raise UserError(
        f"cannot tell the size of {model_id}: no local config.json, not in the Hugging Face cache, and not one "
        f"of the shipped models ({', '.join(KNOWN)}); point huggingface_id at a local folder"
    )
