"""From dataset files to token rows for training and eval, cached.

The token rows depend only on the data's bytes, the tokenizer, the chat template and the length and
format settings, so they are cached under that key: a repeated or resumed run does not tokenize again.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from contract.chat_templates import ChatTemplate
from contract.errors import UserError
from contract.strategy import FineTunerConfig
from inputs.data.placeholders import unfilled_warning
from inputs.data.records import read_dataset
from trainer.data.tokenize import ConversationEncoder, EncodeStats
from contract.job_folder import llamafarm_home

# Bump when encoding changes, so stale cached rows are never used.
ENCODING_VERSION = 2


@dataclass
class Prepared:
    train: list[tuple[list[int], list[int]]]
    eval: list[tuple[list[int], list[int]]]
    stats: EncodeStats
    cache_hit: bool
    cache_key: str


def _file_digest(path: Path) -> str:
    from inputs.data.llamafactory_info import entry_file, is_entry

    h = hashlib.sha256()
    if is_entry(path):  # a registry entry: its own text (columns, tags) and the file it names
        h.update(Path(str(path).rsplit(":", 1)[0]).read_bytes() + str(path).rsplit(":", 1)[1].encode())
        path = entry_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def cache_key(dataset: Path, eval_file: Path | None, tokenizer, template: ChatTemplate, cfg: FineTunerConfig) -> str:
    d = cfg.dataset
    parts = {
        "version": ENCODING_VERSION,
        "data": _file_digest(dataset),
        "eval": _file_digest(eval_file) if eval_file else None,
        "tokenizer": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest(),
        "specials": [tokenizer.bos_token, tokenizer.eos_token],
        "template": template.jinja,
        "max_seq_length": cfg.training_args.max_seq_length,
        "truncation": d.truncation,
        "train_on_inputs": d.train_on_inputs,
        "format": d.format,
        "columns": sorted(d.columns.items()),
        "replace": sorted(d.replace.items()),
        "text_mode": d.text_mode,
        "eval_fraction": d.eval_fraction,
        "seed": cfg.training_args.seed,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _save(path: Path, prepared: Prepared) -> None:
    import numpy as np

    def flat(rows):
        lengths = np.array([len(ids) for ids, _ in rows], dtype=np.int64)
        ids = np.array([t for r, _ in rows for t in r], dtype=np.int64)
        labels = np.array([t for _, r in rows for t in r], dtype=np.int64)
        return lengths, ids, labels

    tl, ti, tlab = flat(prepared.train)
    el, ei, elab = flat(prepared.eval)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")  # concurrent jobs may write the same key
    stats = json.dumps(asdict(prepared.stats))
    np.savez(tmp, train_lengths=tl, train_ids=ti, train_labels=tlab, eval_lengths=el, eval_ids=ei,
             eval_labels=elab, stats=np.frombuffer(stats.encode(), dtype=np.uint8))
    tmp.replace(path)


def _load(path: Path, key: str) -> Prepared:
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        def rows(prefix):
            out, at = [], 0
            ids, labels = z[f"{prefix}_ids"].tolist(), z[f"{prefix}_labels"].tolist()
            for n in z[f"{prefix}_lengths"].tolist():
                out.append((ids[at : at + n], labels[at : at + n]))
                at += n
            return out

        stats = EncodeStats(**json.loads(bytes(z["stats"]).decode()))
        return Prepared(rows("train"), rows("eval"), stats, True, key)


def split_eval(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded share of the items held out for evaluation, in their order: (train, eval)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(items) * fraction))
    if n_eval >= len(items):
        raise UserError(f"dataset.eval_fraction {fraction} leaves no training rows out of {len(items)}")
    held = set(order[:n_eval])
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def prepare(dataset: Path, cfg: FineTunerConfig, tokenizer, template: ChatTemplate, eval_file: Path | None = None) -> Prepared:
    key = cache_key(dataset, eval_file, tokenizer, template, cfg)
    path = llamafarm_home() / "cache" / "tokenized" / f"{key}.npz"
    if path.exists():
        try:
            return _load(path, key)
        except Exception:  # a damaged cache file is rebuilt, never trusted
            path.unlink(missing_ok=True)
    d, args = cfg.dataset, cfg.training_args
    encoder = ConversationEncoder(tokenizer, template, args.max_seq_length, d.train_on_inputs, d.truncation, d.text_mode)
    conversations = read_dataset(dataset, d.format, d.columns, d.replace)
    rows, stats = encoder.encode_all(conversations)
    stats.warnings = [w for w in (unfilled_warning(conversations),) if w]
    if eval_file:
        eval_rows, _ = encoder.encode_all(read_dataset(eval_file, d.format, d.columns, d.replace))
    elif d.eval_fraction:
        rows, eval_rows = split_eval(rows, d.eval_fraction, args.seed)
    else:
        eval_rows = []
    prepared = Prepared(rows, eval_rows, stats, False, key)
    _save(path, prepared)
    return prepared
