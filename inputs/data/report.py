"""What a dataset looks like before any training: `llamafarm finetune dataset validate`.

The counts that need no tokenizer come from `describe` here; token lengths come from the trainer's
`token_stats` (trainer/data/report.py), which renders every row through the strategy's tokenizer and template.
"""

from __future__ import annotations

import json
from pathlib import Path

from inputs.data.placeholders import unfilled
from inputs.data.records import Conversation, read_dataset


def _preference_conversations(path: Path, fmt: str, columns: dict | None) -> list[tuple[str, Conversation]] | None:
    """Preference rows as conversations with their first answer, by a key of the whole row (for
    duplicates), or None when the file holds no preference data."""
    from contract.strategy import PREFERENCE_FORMATS
    from inputs.data.preference import Pair, detect_preference_format, first_row, read_preference_dataset

    row = first_row(path) if fmt == "auto" else None
    row_format = fmt if fmt in PREFERENCE_FORMATS else (detect_preference_format(row) if row else None)
    if row_format is None:
        return None
    out = []
    for it in read_preference_dataset(path, fmt, columns):
        answers = (it.chosen, it.rejected) if isinstance(it, Pair) else (it.completion, it.desirable)
        conv = Conversation((*it.prompt, {"role": "assistant", "content": answers[0]}), it.where, row_format)
        out.append((json.dumps([it.prompt, *answers], sort_keys=True), conv))
    return out


def describe(path: Path, fmt: str = "auto", columns: dict | None = None, replace: dict | None = None) -> dict:
    """Counts with no tokenizer; preference rows count once each (a pair is one row)."""
    keyed = _preference_conversations(path, fmt, columns)
    if keyed is None:
        keyed = [(c.text if c.text is not None else json.dumps(c.messages, sort_keys=True), c)
                 for c in read_dataset(path, fmt, columns, replace)]
    conversations = [conv for _, conv in keyed]
    seen: dict[str, str] = {}
    duplicates = []
    for key, conv in keyed:
        if key in seen:
            duplicates.append(f"{conv.where} repeats {seen[key]}")
        else:
            seen[key] = conv.where
    turns = [sum(m["role"] == "assistant" for m in c.messages) for c in conversations]
    return {
        "dataset": str(path),
        "format": conversations[0].format,
        "rows": len(conversations),
        "blank_lines": _blank_lines(path),
        "duplicates": len(duplicates),
        "duplicate_examples": duplicates[:5],
        "multi_turn_rows": sum(t > 1 for t in turns),
        "with_system_prompt": sum(bool(c.messages) and c.messages[0]["role"] == "system" for c in conversations),
        "with_tools": sum(bool(c.tools) or any(m["role"] == "tool" for m in c.messages) for c in conversations),
        "unfilled_placeholders": unfilled(conversations),
    }


def _blank_lines(path: Path) -> int:
    if path.suffix != ".jsonl" or not path.is_file():
        return 0
    return sum(1 for line in path.read_text(encoding="utf-8-sig").splitlines() if not line.strip())


def percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]
