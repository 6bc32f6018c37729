"""What a dataset looks like to a strategy, before any training: `llamafarm finetune dataset validate`.

The counts that need no tokenizer come from `describe` (no torch); token lengths come from `token_stats`,
which loads the strategy's tokenizer and renders every row through its chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.data.placeholders import unfilled
from trainer.data.records import Conversation, read_dataset


def _preference_conversations(path: Path, fmt: str, columns: dict | None) -> list[tuple[str, Conversation]] | None:
    """Preference rows as conversations with their first answer, by a key of the whole row (for
    duplicates), or None when the file holds no preference data."""
    from contract.strategy import PREFERENCE_FORMATS
    from trainer.data.preference import Pair, detect_preference_format, first_row, read_preference_dataset

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


def _percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def token_stats(conversations: list[Conversation], cfg) -> dict:
    """Token lengths per row before any cut (p50/p95/max), and what training gets after the cut, both
    from the encoder training uses, so "in the loss" never exceeds "tokens per epoch"."""
    from transformers import AutoTokenizer

    from trainer.data.tokenize import IGNORE_INDEX, ConversationEncoder, choose_template
    from trainer.generate import quiet_libraries
    from trainer.models import source

    quiet_libraries()
    tokenizer = AutoTokenizer.from_pretrained(source.resolve(cfg.base_model), revision=cfg.base_model.revision)
    template, reason = choose_template(cfg.dataset.template, tokenizer)
    limit, d = cfg.training_args.max_seq_length, cfg.dataset
    encoder = ConversationEncoder(tokenizer, template, limit, d.train_on_inputs, d.truncation, d.text_mode)
    lengths = [len(encoder.encode_row(conv)[0]) for conv in conversations]
    rows, stats = encoder.encode_all(conversations)
    blocks = any(c.text is not None for c in conversations) and d.text_mode == "blocks"
    return {
        "template": template.name,
        "template_reason": reason,
        "max_seq_length": limit,
        "tokens_p50": _percentile(lengths, 0.5),
        "tokens_p95": _percentile(lengths, 0.95),
        "tokens_max": max(lengths),
        "over_max_seq_length": sum(n > limit for n in lengths),
        "over_action": f"text joined and cut into {stats.text_blocks} blocks" if blocks else d.truncation,
        "tokens_total": stats.source_tokens,
        "tokens_per_epoch": stats.tokens,
        "share_trained": round(stats.share_trained, 4),
        "target_tokens": sum(sum(label != IGNORE_INDEX for label in labels[1:]) for _, labels in rows),
    }
