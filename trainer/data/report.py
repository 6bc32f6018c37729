"""What a dataset looks like to a strategy, before any training: `llamafarm finetune dataset validate`.

The counts that need no tokenizer come from `describe` (no torch); token lengths come from `token_stats`,
which loads the strategy's tokenizer and renders every row through its chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.data.placeholders import unfilled
from trainer.data.records import Conversation, read_dataset


def describe(path: Path, fmt: str = "auto", columns: dict | None = None, replace: dict | None = None) -> dict:
    conversations = read_dataset(path, fmt, columns, replace)
    seen: dict[str, str] = {}
    duplicates = []
    for conv in conversations:
        key = conv.text if conv.text is not None else json.dumps(conv.messages, sort_keys=True)
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
