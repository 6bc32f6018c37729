"""Writing checkpoints and final weights into the job folder: safetensors only, atomically.

Each artifact folder holds the weights (a PEFT adapter or full model), the tokenizer with the chat
template that shaped the training data, and the resolved strategy, so it says how it was made.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from contract.job_folder import BEST_DIR, CHECKPOINTS_DIR, FINAL_DIR, STRATEGY_FILE


def _write_artifact(model, tokenizer, strategy_text: str, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / STRATEGY_FILE).write_text(strategy_text)
    if target.exists():
        shutil.rmtree(target)
    os.rename(tmp, target)  # readers see a complete folder or none


def save_checkpoint(model, tokenizer, strategy_text: str, job_dir: Path, step: int, keep: int) -> Path:
    root = job_dir / CHECKPOINTS_DIR
    target = root / f"checkpoint-{step}"
    _write_artifact(model, tokenizer, strategy_text, target)
    existing = sorted(
        (p for p in root.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    for old in existing[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def save_final(model, tokenizer, strategy_text: str, job_dir: Path) -> Path:
    target = job_dir / FINAL_DIR
    _write_artifact(model, tokenizer, strategy_text, target)
    return target


def save_best(model, tokenizer, strategy_text: str, job_dir: Path) -> Path:
    target = job_dir / BEST_DIR
    _write_artifact(model, tokenizer, strategy_text, target)
    return target
