"""Token lengths of a dataset under a strategy's tokenizer and chat template (`dataset validate --strategy`).

The counts that need no tokenizer are inputs/data/report.py's `describe`.
"""

from __future__ import annotations

from inputs.data.records import Conversation
from inputs.data.report import percentile


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
        "tokens_p50": percentile(lengths, 0.5),
        "tokens_p95": percentile(lengths, 0.95),
        "tokens_max": max(lengths),
        "over_max_seq_length": sum(n > limit for n in lengths),
        "over_action": f"text joined and cut into {stats.text_blocks} blocks" if blocks else d.truncation,
        "tokens_total": stats.source_tokens,
        "tokens_per_epoch": stats.tokens,
        "share_trained": round(stats.share_trained, 4),
        "target_tokens": sum(sum(label != IGNORE_INDEX for label in labels[1:]) for _, labels in rows),
    }
