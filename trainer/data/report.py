"""What a dataset looks like to a strategy, before any training: `llamafarm finetune dataset validate`.

The counts that need no tokenizer come from `describe` (no torch); token lengths come from `token_stats`,
which loads the strategy's tokenizer and renders every row through its chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.data.records import Conversation, read_dataset


def describe(path: Path, fmt: str = "auto", columns: dict | None = None) -> dict:
    conversations = read_dataset(path, fmt, columns)
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
    }


def _blank_lines(path: Path) -> int:
    if path.suffix != ".jsonl":
        return 0
    return sum(1 for line in path.read_text(encoding="utf-8-sig").splitlines() if not line.strip())


def _percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def token_stats(conversations: list[Conversation], cfg) -> dict:
    """Token lengths through the strategy's tokenizer and template, before any truncation."""
    from transformers import AutoTokenizer

    from trainer.data.tokenize import ConversationEncoder, choose_template
    from trainer.generate import quiet_libraries
    from trainer.models import source

    quiet_libraries()
    tokenizer = AutoTokenizer.from_pretrained(source.resolve(cfg.base_model), revision=cfg.base_model.revision)
    template, reason = choose_template(cfg.dataset.template, tokenizer)
    limit = cfg.training_args.max_seq_length
    encoder = ConversationEncoder(tokenizer, template, limit, cfg.dataset.train_on_inputs, cfg.dataset.truncation)
    lengths, targets = [], []
    for conv in conversations:
        ids, labels = encoder.encode_text(conv.text) if conv.text is not None else encoder.encode(list(conv.messages))
        lengths.append(len(ids))
        targets.append(sum(label != -100 for label in labels[1:]))
    over = sum(n > limit for n in lengths)
    kept = [min(n, limit) for n in lengths if cfg.dataset.truncation == "truncate" or n <= limit]
    return {
        "template": template.name,
        "template_reason": reason,
        "max_seq_length": limit,
        "tokens_p50": _percentile(lengths, 0.5),
        "tokens_p95": _percentile(lengths, 0.95),
        "tokens_max": max(lengths),
        "over_max_seq_length": over,
        "over_action": cfg.dataset.truncation,
        "tokens_per_epoch": sum(kept),
        "target_tokens": sum(targets),
    }
