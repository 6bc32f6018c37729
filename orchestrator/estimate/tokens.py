"""Tokens in a dataset under a strategy, with the `tokenizers` library and jinja2 (no torch).

The strategy's chat template renders each row as training will; the model's tokenizer.json (a local
folder, a builtin already built, or the Hugging Face cache) counts it. Without a tokenizer on disk,
4 characters per token is assumed and said.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from contract.chat_templates import FALLBACK_TEMPLATE, get_template
from contract.strategy import Strategy
from inputs.data.preference import read_for_stage


def _tokenizer(strategy: Strategy):
    """(tokenizers.Tokenizer, bos, eos, the model's own chat template or None, a label) or None."""
    from tokenizers import Tokenizer

    from inputs.models import builtin

    model_id = strategy.cfg.base_model.huggingface_id
    folder = None
    local = Path(model_id).expanduser()
    if builtin.is_builtin(model_id):
        spec = builtin.get_spec(model_id)
        if isinstance(spec, builtin.BuiltinSpec):
            # A tiny builtin's tokenizer is rebuilt from the corpus here (about 1 s, no torch) when the
            # model itself has not been built yet.
            raw, names, own = builtin.raw_tokenizer(spec)
            return raw, names["bos_token"], names["eos_token"], own, f"{spec.name}'s tokenizer"
        folder = builtin.cached_path(model_id)  # a real one is read once it is on disk
        if folder is None:
            return None
    elif model_id.startswith("ollama:") or model_id.endswith(".gguf"):
        from inputs.models import gguf

        folder = gguf.cached_folder(model_id)  # once dequantized; else characters are counted
        if folder is None:
            return None
    elif (local / "tokenizer.json").exists():
        folder = local
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(model_id, "tokenizer.json", revision=strategy.cfg.base_model.revision)
        except Exception:
            hit = None
        folder = Path(hit).parent if isinstance(hit, str) else None
    if folder is None:
        return None
    config = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").exists() else {}
    own = (folder / "chat_template.jinja").read_text() if (folder / "chat_template.jinja").exists() else config.get("chat_template")
    return (Tokenizer.from_file(str(folder / "tokenizer.json")), config.get("bos_token") or "",
            config.get("eos_token") or "", own, f"{folder.name}'s tokenizer")


@dataclass(frozen=True)
class TokenCount:
    """A dataset's tokens as training takes them."""

    rows: list[int]
    """Tokens of each row that is a sequence of its own: cut to max_seq_length, or left out when
    longer and the strategy drops such rows."""
    joined: int
    """Tokens of plain-text documents joined and cut into full max_seq_length blocks (text_mode blocks)."""
    source: str

    @property
    def total(self) -> int:
        return sum(self.rows) + self.joined


def count_tokens(dataset: Path, strategy: Strategy, conversations=None) -> TokenCount:
    d = strategy.cfg.dataset
    conversations = conversations or read_for_stage(dataset, strategy.cfg)
    limit = strategy.cfg.training_args.max_seq_length
    found = _tokenizer(strategy)
    if found is None:
        length, source = _guessed_length, "assumed 4 characters per token (no tokenizer on disk)"
    else:
        length, source = _counter(found, d.template)
    rows, joined = [], 0
    for c in conversations:
        n = length(c)
        if c.text is not None and d.text_mode == "blocks":
            joined += n  # documents joined and cut into blocks: every token trains
        elif found is None or n <= limit or d.truncation == "truncate":
            rows.append(min(n, limit))  # longer rows are cut to the limit, or dropped (not on a guess)
    return TokenCount(rows, joined, source)


def _guessed_length(c) -> int:
    return (len(c.text or "") + sum(len(m["content"]) + 8 for m in c.messages)) // 4


def _counter(found, template_setting: str):
    """(tokens of one row as the model's tokenizer and the strategy's template make it, the source line)."""
    import jinja2

    tok, bos, eos, own, label = found
    name = template_setting if template_setting != "auto" else (None if own else FALLBACK_TEMPLATE)
    env = jinja2.Environment()
    # The tojson of Hugging Face's template renderer (options included), which the tool templates use.
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    template = env.from_string(own if name is None else get_template(name).jinja)

    def length(c) -> int:
        text = c.text if c.text is not None else template.render(messages=list(c.messages), bos_token=bos,
                                                                 eos_token=eos, add_generation_prompt=False,
                                                                 tools=list(c.tools) or None)
        # BOS once: from the template text when it writes one, else from the tokenizer; then EOS.
        return len(tok.encode(text, add_special_tokens=not (bos and text.startswith(bos))).ids) + 1

    return length, f"counted with {label} and the {name or 'model'} template"
