"""Tiny model fixtures, one per supported model family, built from code in a few seconds.

    .venv/bin/python -m trainer.models.families qwen3 /tmp/tiny-qwen3

Each family is the real transformers class (Qwen2ForCausalLM, Gemma2ForCausalLM, ...) at a tiny size,
seeded random weights, and a tokenizer of that family's kind trained on the bundled corpus: byte-level
BPE with the Qwen2 pre-tokenizer for Qwen, SentencePiece-style BPE with byte fallback for Mistral and
Phi-3 (a "▁" word marker, BOS added), and Gemma's SentencePiece variant (spaces become "▁" with no
marker prepended, BOS added). The tests train each one through the real entrypoint and export it.

Sizes: hidden and feed-forward widths are multiples of 256 so that q4_k_m really writes K-quant
blocks (rows of 256 values) instead of falling back to other types.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from contract.errors import UserError
from inputs.models.builtin import _trained_bpe, spm_text_steps

# The Qwen2 pre-tokenizer: like Llama 3's but digits one at a time.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str
    """transformers' model_type (AutoConfig.for_model)."""
    tokenizer: str
    """"qwen-bpe", "llama-spm" or "gemma-spm"."""
    specials: tuple[str, ...]
    """Control tokens, in id order (SentencePiece kinds put them first, Qwen after the learned vocabulary)."""
    names: dict[str, str]
    """bos/eos/unk/pad token texts."""
    template: str
    """The named chat template (contract/chat_templates.py) the tokenizer ships with."""
    config: dict = field(default_factory=dict)
    """What makes the family itself: biases, q/k norms, softcapping, sliding window, head size."""
    what: str = ""
    rstrip: tuple[str, ...] = ()
    """Control tokens that swallow the whitespace after them (Phi-3's chat tokens, as in its tokenizer.json)."""


_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_QWEN_NAMES = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
_SPM_NAMES = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("qwen2", "qwen2", "qwen-bpe", _QWEN_SPECIALS, _QWEN_NAMES, "chatml",
               {"tie_word_embeddings": True}, "Qwen2.5: q/k/v biases, tied embeddings"),
        Family("qwen3", "qwen3", "qwen-bpe", _QWEN_SPECIALS, _QWEN_NAMES, "chatml",
               {"tie_word_embeddings": True, "head_dim": 64}, "Qwen3: q/k RMS norms, explicit head size"),
        Family("mistral", "mistral", "llama-spm", ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), _SPM_NAMES,
               "mistral-v3", {"sliding_window": 4096}, "Mistral v0.3: sliding window in the config, [INST] control tokens"),
        Family("gemma2", "gemma2", "gemma-spm",
               ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
               {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}, "gemma",
               {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 32, "attn_logit_softcapping": 50.0,
                "final_logit_softcapping": 30.0, "tie_word_embeddings": True},
               "Gemma 2: scaled embeddings, sandwich norms, logit soft-capping, alternating sliding window"),
        Family("phi3", "phi3", "llama-spm",
               ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
               {**_SPM_NAMES, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, "phi3",
               {"tie_word_embeddings": False}, "Phi-3: fused qkv_proj and gate_up_proj",
               rstrip=("</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")),
        # Qwen3-30B-A3B's kind: every layer a mixture of experts (no shared expert), top-k weights
        # renormalised (norm_topk_prob, which llama.cpp's qwen3moe graph always does), untied head.
        Family("qwen3_moe", "qwen3_moe", "qwen-bpe", _QWEN_SPECIALS, _QWEN_NAMES, "chatml",
               {"tie_word_embeddings": False, "head_dim": 64, "num_experts": 4, "num_experts_per_tok": 2,
                "moe_intermediate_size": 512, "norm_topk_prob": True},
               "Qwen3-MoE: 4 experts, top-2 routing, experts fused in 3-D parameters"),
    )
}

# The shared tiny shape (GQA: 4 query heads, 2 key/value heads of 64).
SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6}
VOCAB_SIZE = 1024
SEED = 1234


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise UserError(f"unknown model family {name!r}; valid: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def _qwen_bpe(family: Family):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    learned, merges = _trained_bpe(pre, VOCAB_SIZE - len(family.specials), alphabet=pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(learned + list(family.specials))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    return tok  # Qwen adds no BOS


def _spm(family: Family, prepend: bool):
    """SentencePiece-style BPE with byte fallback; `prepend`: a "▁" before every text segment."""
    from tokenizers import Tokenizer, decoders, models, processors

    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    # Gemma prepends no "▁" (llama.cpp: add_space_prefix false); Llama, Mistral and Phi-3 do.
    normalizer, split = spm_text_steps(prepend)
    learned, merges = _trained_bpe(split, VOCAB_SIZE - len(family.specials) - len(byte_tokens), alphabet=[],
                                   normalizer=normalizer)
    tokens = list(family.specials) + byte_tokens + [t for t in learned if t not in family.specials and t not in byte_tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = family.names["unk_token"]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.pre_tokenizer = split
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prepend else []))
    bos = family.names["bos_token"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, vocab[bos])])
    return tok


def raw_tokenizer(family: Family):
    from tokenizers import AddedToken

    if family.tokenizer == "qwen-bpe":
        raw = _qwen_bpe(family)
    else:
        raw = _spm(family, prepend=family.tokenizer != "gemma-spm")
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=t in family.rstrip)
                            for t in family.specials])
    return raw


def build(name: str, out: Path) -> Path:
    """Write the family's tiny model folder (config, seeded weights, tokenizer) to `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    from contract.chat_templates import TEMPLATES

    family = get_family(name)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw_tokenizer(family), clean_up_tokenization_spaces=False,
                                        **family.names)
    tokenizer.chat_template = TEMPLATES[family.template].jinja
    tokenizer.save_pretrained(out)
    ids = {k.removesuffix("_token") + "_token_id": tokenizer.convert_tokens_to_ids(v)
           for k, v in family.names.items() if k != "unk_token"}
    config = AutoConfig.for_model(family.model_type, vocab_size=len(tokenizer), **SHAPE, **family.config, **ids)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(**ids).save_pretrained(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: python -m trainer.models.families FAMILY OUT_DIR  (families: {', '.join(FAMILIES)})")
    print(json.dumps(str(build(sys.argv[1], Path(sys.argv[2])))))
