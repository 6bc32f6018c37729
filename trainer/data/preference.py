"""Preference items as token rows for training and evaluation: pairs whole or not at all.

Reading the files (formats, file:line errors) is inputs/data/preference.py, which the host uses too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from contract.errors import UserError
from inputs.data.preference import Pair, as_stage_items, read_preference_dataset
from trainer.data.prepare import split_eval
from trainer.data.tokenize import IGNORE_INDEX, ConversationEncoder, EncodeStats

Row = tuple[list[int], list[int]]


@dataclass
class PairRows:
    chosen: Row
    rejected: Row


@dataclass
class UnpairedRows:
    row: Row
    desirable: bool
    mismatched: Row
    """This prompt with another row's answer: KTO's estimate of the policy's drift from the reference."""


def _encode(encoder: ConversationEncoder, prompt, answer: str, stats: EncodeStats) -> Row | None:
    ids, labels = encoder.encode([*prompt, {"role": "assistant", "content": answer}])
    if len(ids) > encoder.max_seq_length:
        if encoder.truncation == "drop":
            stats.dropped_too_long += 1
            return None
        stats.truncated += 1
        ids, labels = ids[: encoder.max_seq_length], labels[: encoder.max_seq_length]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        stats.dropped_no_target += 1
        return None
    stats.tokens += len(ids)
    stats.target_tokens += sum(label != IGNORE_INDEX for label in labels[1:])
    stats.lengths.append(len(ids))
    return ids, labels


def encode_items(encoder: ConversationEncoder, items: list) -> tuple[list, EncodeStats]:
    """Token rows for each item; an item goes whole or not at all (a pair never loses one side)."""
    stats, out = EncodeStats(), []
    for k, item in enumerate(items):
        stats.rows += 1
        if isinstance(item, Pair):
            rows = [_encode(encoder, item.prompt, a, stats) for a in (item.chosen, item.rejected)]
            if None not in rows:
                out.append(PairRows(*rows))
        else:
            other = items[(k + 1) % len(items)].completion if len(items) > 1 else item.completion
            row, mismatched = (_encode(encoder, item.prompt, a, stats) for a in (item.completion, other))
            if row is not None and mismatched is not None:
                out.append(UnpairedRows(row, item.desirable, mismatched))
    if not out:
        raise UserError(
            f"no usable preference rows: {stats.dropped_too_long} answers longer than max_seq_length="
            f"{encoder.max_seq_length} (dropped), {stats.dropped_no_target} with no answer tokens left; "
            "raise training_args.max_seq_length or set dataset.truncation: truncate"
        )
    return out, stats


@dataclass
class PreparedPreference:
    train: list
    eval: list
    stats: EncodeStats
    cache_hit: bool = False  # the SFT token cache is not used for preference data (small sets; a TODO)


def prepare_preference(dataset: Path, cfg, tokenizer, template, eval_file: Path | None = None) -> PreparedPreference:
    """Train and eval items for a preference stage; the eval split is seeded like the SFT one."""
    d, args, stage = cfg.dataset, cfg.training_args, cfg.method.stage
    encoder = ConversationEncoder(tokenizer, template, args.max_seq_length, False, d.truncation)
    items = as_stage_items(read_preference_dataset(dataset, d.format, d.columns), stage, str(dataset))
    eval_items = []
    if eval_file:
        eval_items = as_stage_items(read_preference_dataset(eval_file, d.format, d.columns), stage, str(eval_file))
    elif d.eval_fraction:
        items, eval_items = split_eval(items, d.eval_fraction, args.seed)
    train, stats = encode_items(encoder, items)
    evaluation = encode_items(encoder, eval_items)[0] if eval_items else []
    return PreparedPreference(train, evaluation, stats)
