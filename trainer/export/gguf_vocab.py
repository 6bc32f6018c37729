"""A Hugging Face fast tokenizer (tokenizer.json) as GGUF tokenizer metadata, without torch.

Two families are written, chosen from the tokenizer itself:
- SentencePiece-style BPE with byte fallback (Llama 2, TinyLlama, Mistral): `tokenizer.ggml.model`
  "llama", with scores that make llama.cpp's score-driven merging follow the BPE merge order
  (a token made by merge k scores -k, so earlier merges win, as in the original BPE);
- byte-level BPE (Llama 3, SmolLM, Qwen2): "gpt2", with the merges and the pre-tokenizer name that
  tells llama.cpp how to split text before merging. An unknown pre-tokenizer is refused rather than
  guessed, because a wrong split tokenizes differently without any error.
The export verifies the result anyway: llama.cpp's tokenization of sample text must equal ours.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import gguf

from contract.errors import UserError


@dataclass
class Vocab:
    model: str  # "llama" (SentencePiece-style) or "gpt2" (byte-level BPE)
    pre: str
    tokens: list[str]
    scores: list[float]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool = False
    """SentencePiece kinds: a "▁" is put before the text (Llama, Mistral, Phi-3), or not (Gemma)."""


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer (its `tokenizer.ggml.pre`)."""
    parts = (pre.get("pretokenizers") or [pre]) if pre else []
    kinds = [p.get("type") for p in parts]
    split = next((p for p in parts if p.get("type") == "Split"), None)
    if split:
        pattern = split.get("pattern", {}).get("Regex", "")
        if r"\p{N}{1,3}" in pattern:
            return "llama-bpe"  # Llama 3: numbers in groups of up to three digits
        if r"\p{N}|" in pattern or pattern.endswith(r"\p{N}"):
            return "qwen2"  # Qwen2: one digit at a time
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    raise UserError(
        f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) is not one llama.cpp is known to reproduce "
        "(Llama 3, Qwen2, SmolLM, GPT-2); GGUF export would tokenize differently, so it is refused"
    )


def _added(tok_json: dict) -> dict[int, dict]:
    return {a["id"]: a for a in tok_json.get("added_tokens", [])}


def _id_ordered(vocab: dict[str, int], added: dict[int, dict], size: int) -> list[str]:
    tokens = [None] * size
    for text, i in vocab.items():
        tokens[i] = text
    for i, a in added.items():
        tokens[i] = a["content"]
    # Models often pad the embedding beyond the tokenizer; llama.cpp needs a token for every row.
    return [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]


def _merges(model: dict) -> list[str]:
    merges = model.get("merges", [])
    # tokenizers >= 0.20 stores merges as pairs; GGUF stores "a b" strings.
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _special_ids(folder: Path, tok_json: dict) -> tuple[dict[str, int], bool, bool]:
    config = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").exists() else {}
    by_text = {a["content"]: a["id"] for a in tok_json.get("added_tokens", [])}
    by_text.update({t: i for t, i in tok_json["model"].get("vocab", {}).items() if t not in by_text})
    ids = {}
    for kind in ("bos", "eos", "unk", "pad"):
        entry = config.get(f"{kind}_token")
        text = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(text, str) and text in by_text:
            ids[kind] = by_text[text]
    # What the tokenizer adds by itself: its post-processor template ("<s> $A").
    add_bos = add_eos = False
    post = tok_json.get("post_processor") or {}
    for proc in post.get("processors", [post]):
        single = proc.get("single", []) if proc.get("type") == "TemplateProcessing" else []
        if single and "SpecialToken" in single[0] and by_text.get(single[0]["SpecialToken"]["id"]) == ids.get("bos"):
            add_bos = True
        if len(single) > 1 and "SpecialToken" in single[-1] and by_text.get(single[-1]["SpecialToken"]["id"]) == ids.get("eos"):
            add_eos = True
    if isinstance(config.get("add_bos_token"), bool):
        add_bos = config["add_bos_token"]
    return ids, add_bos, add_eos


def _adds_space_prefix(tok_json: dict) -> bool:
    """Whether the tokenizer puts a "▁" before the text: a Metaspace that prepends, or a Prepend normalizer."""
    def steps(node: dict | None, key: str) -> list[dict]:
        return (node.get(key) or [node]) if node else []

    pre = steps(tok_json.get("pre_tokenizer"), "pretokenizers")
    norm = steps(tok_json.get("normalizer"), "normalizers")
    return (any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never" for p in pre)
            or any(n.get("type") == "Prepend" for n in norm))


def read_vocab(folder: Path, vocab_size: int) -> Vocab:
    path = folder / "tokenizer.json"
    if not path.exists():
        raise UserError(f"{folder} has no tokenizer.json; GGUF export needs a fast (tokenizers) tokenizer")
    tok_json = json.loads(path.read_text())
    model = tok_json["model"]
    if model.get("type") != "BPE":
        raise UserError(f"{path}: tokenizer model {model.get('type')} is not BPE; GGUF export supports BPE tokenizers")
    added = _added(tok_json)
    highest = max([*model["vocab"].values(), *added]) + 1
    if highest > vocab_size:
        raise UserError(f"{path}: the tokenizer has ids up to {highest - 1} but the model's vocabulary holds {vocab_size}")
    size = vocab_size
    tokens = _id_ordered(model["vocab"], added, size)
    merges = _merges(model)
    special_ids, add_bos, add_eos = _special_ids(folder, tok_json)
    T = gguf.TokenType
    types = [T.NORMAL] * size
    for i, a in added.items():
        types[i] = T.CONTROL if a.get("special") else T.USER_DEFINED
    for i, t in enumerate(tokens):
        if i >= highest:
            types[i] = T.UNUSED
    scores = [0.0] * size
    if model.get("byte_fallback"):
        # SentencePiece style: byte tokens, an unknown token, and scores in merge order.
        for i, t in enumerate(tokens):
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
                types[i] = T.BYTE
        if "unk" in special_ids:
            types[special_ids["unk"]] = T.UNKNOWN
        ids = {t: i for i, t in enumerate(tokens)}
        ranked = set()
        for rank, merge in enumerate(merges):
            merged = merge.replace(" ", "")
            i = ids.get(merged)
            if i is not None and i not in ranked:
                scores[i] = -float(rank + 1)
                ranked.add(i)
        return Vocab("llama", "default", tokens, scores, [int(t) for t in types], [], special_ids, add_bos, add_eos,
                     _adds_space_prefix(tok_json))
    if (tok_json.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(f"{path}: a BPE tokenizer without byte fallback must be byte-level (decoder ByteLevel)")
    pre = _pre_tokenizer_name(tok_json.get("pre_tokenizer"))
    return Vocab("gpt2", pre, tokens, scores, [int(t) for t in types], merges, special_ids, add_bos, add_eos)


def add_vocab(writer: gguf.GGUFWriter, vocab: Vocab, chat_template: str | None) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for kind, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.model == "llama":
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if chat_template:
        writer.add_chat_template(chat_template)
