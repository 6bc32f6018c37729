"""`{{name}}` placeholders in dataset rows, filled from `dataset.replace` (LlamaFactory's identity
dataset writes its model's name and author this way), and the count of those left unfilled."""

from __future__ import annotations

import re

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def fill_placeholders(value, replace: dict[str, str]):
    """The row with every `{{key}}` of `replace` filled, in every string however deeply nested."""
    if isinstance(value, str):
        return PLACEHOLDER.sub(lambda m: replace.get(m.group(1), m.group(0)), value)
    if isinstance(value, dict):
        return {k: fill_placeholders(v, replace) for k, v in value.items()}
    if isinstance(value, list):
        return [fill_placeholders(v, replace) for v in value]
    return value


def unfilled(conversations) -> dict[str, int]:
    """Placeholder name -> rows still holding it, for the warning."""
    counts: dict[str, int] = {}
    for conv in conversations:
        texts = [conv.text] if conv.text is not None else [m.get("content") or "" for m in conv.messages]
        for name in {m.group(1) for t in texts for m in PLACEHOLDER.finditer(t)}:
            counts[name] = counts.get(name, 0) + 1
    return counts


def unfilled_warning(conversations) -> str | None:
    counts = unfilled(conversations)
    if not counts:
        return None
    names = ", ".join(f"{{{{{k}}}}} in {n} row(s)" for k, n in sorted(counts.items()))
    keys = ", ".join(f"{k}: ..." for k in sorted(counts))
    return (f"warning: {sum(counts.values())} unfilled placeholder(s) would be trained as written: {names}; "
            f"fill them with dataset.replace: {{{keys}}}")
