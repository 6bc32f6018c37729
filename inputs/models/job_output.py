"""A previous job's output as a base model: `base_model.huggingface_id: job:<job_id>`, or the path of
a job folder or of its final/ folder. This is how a multi-stage run starts stage 2 from stage 1.

`base_folder` turns such a reference into a plain model folder, once, where a strategy is loaded
(orchestrator/cli/base.py), so everything after it (estimate, trainer, both backends, generate,
export) sees an ordinary local model:
  - full fine-tune output: its final/ folder as it is (weights, tokenizer, config.json);
  - LoRA/QLoRA output: the adapter merged into its own base, saved once in the machine-wide cache
    ($LLAMAFARM_CACHE/merged/<job>-<hash of the adapter>) with the tokenizer it was trained with.
The tokenizer carries the stage's chat template, so `template: auto` keeps the previous stage's format.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from contract.errors import UserError
from contract.job_folder import FINAL_DIR, JOB_FILE, STRATEGY_FILE, jobs_root, read_job

PREFIX = "job:"
ADAPTER_CONFIG = "adapter_config.json"


def final_folder(model_id: str) -> Path | None:
    """The final/ folder a reference names, or None when model_id is not a job output."""
    if model_id.startswith(PREFIX):
        job_id = model_id.removeprefix(PREFIX)
        folder = jobs_root() / job_id
        if not (folder / JOB_FILE).is_file():
            raise UserError(f"base model {model_id}: no job {job_id!r} in {jobs_root()}; `llamafarm finetune jobs` lists them")
    else:
        folder = Path(model_id).expanduser()
        if not (folder / JOB_FILE).is_file() and not (folder / STRATEGY_FILE).is_file():
            return None  # an ordinary model folder, hub id or builtin
    if (folder / JOB_FILE).is_file():
        job = read_job(folder)
        if job.get("status") != "completed":
            raise UserError(f"base model {model_id}: job {folder.name} is {job.get('status')}; "
                            "only a completed job's output can be a base model")
        folder = folder / FINAL_DIR
    if not (folder / STRATEGY_FILE).is_file():
        raise UserError(f"base model {model_id}: {folder} holds no trained model (no {STRATEGY_FILE})")
    return folder.resolve()


def _adapter_hash(final: Path) -> str:
    h = hashlib.sha256()
    for name in ("adapter_model.safetensors", ADAPTER_CONFIG, STRATEGY_FILE):
        h.update((final / name).read_bytes())
    return h.hexdigest()[:12]


def merged_path(final: Path) -> Path:
    from contract.paths import cache_root

    job = final.parent.name if final.name == FINAL_DIR else final.name
    return cache_root() / "merged" / f"{job}-{_adapter_hash(final)}"


def base_folder(model_id: str, merge: Callable[[Path, Path], None], echo=print) -> Path | None:
    """A plain model folder for a job-output reference, else None. A LoRA output is merged into its base
    first by `merge(final, target)` (torch: the host runs `python -m trainer merge-base` for it)."""
    final = final_folder(model_id)
    if final is None:
        return None
    if not (final / ADAPTER_CONFIG).is_file():
        return final
    target = merged_path(final)
    if not (target / "config.json").is_file():
        echo(f"base model {model_id}: merging its LoRA adapter into its base (first use; cached in {target})")
        merge(final, target)
    return target
