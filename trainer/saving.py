"""Writing checkpoints and final weights into the job folder: safetensors weights, atomically.

Each artifact folder holds the weights (a PEFT adapter or full model), the tokenizer with the chat
template that shaped the training data, and the resolved strategy, so it says how it was made.
A checkpoint also holds what an exact resume needs: optimizer and scheduler state and the RNG states
(optimizer.pt, read back with weights_only=True), and the data position (trainer_state.json, written
last). Everything is written under a temporary name and renamed into place, so a crash or a full
disk leaves the earlier checkpoints as they were and never a half-written one under a real name.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from contract.errors import UserError
from contract.job_folder import BEST_DIR, CHECKPOINTS_DIR, FINAL_DIR, STRATEGY_FILE, TRAINER_STATE_FILE, complete_checkpoints

OPTIMIZER_FILE = "optimizer.pt"


@dataclass
class TrainState:
    """Where training stands after `step` optimizer steps."""

    step: int
    epoch: int
    groups_done: int  # optimizer steps already taken in `epoch`
    best_eval_loss: float | None = None


def _write_weights(model, tokenizer, strategy_text: str, tmp: Path, state_dict: dict | None = None) -> None:
    # state_dict: the whole weights gathered from an FSDP-sharded model (trainer.distributed)
    model.save_pretrained(tmp, safe_serialization=True, **({} if state_dict is None else {"state_dict": state_dict}))
    tokenizer.save_pretrained(tmp)
    (tmp / STRATEGY_FILE).write_text(strategy_text)


def _write_artifact(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)  # readers see a complete folder or none
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM):
            raise UserError(
                f"cannot write {target}: {exc.strerror}; earlier checkpoints are intact. "
                "Free disk space or fix the folder's permissions, then `llamafarm finetune resume`"
            ) from None
        raise


def rng_state() -> dict:
    import numpy as np
    import torch

    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def restore_rng(state: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(model, tokenizer, strategy_text: str, job_dir: Path, state: TrainState, optimizer, scheduler,
                    scaler, keep: int, rng_by_rank: list[dict] | None = None) -> Path:
    """rng_by_rank: every process's RNG states (distributed jobs), so each resumes its own streams."""
    import torch

    def write(tmp: Path) -> None:
        _write_weights(model, tokenizer, strategy_text, tmp)
        extra = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict() if scaler else None, "rng": rng_state()}
        if rng_by_rank is not None:
            extra["rng_by_rank"] = rng_by_rank
        torch.save(extra, tmp / OPTIMIZER_FILE)
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")

    target = job_dir / CHECKPOINTS_DIR / f"checkpoint-{state.step}"
    target.parent.mkdir(exist_ok=True)
    _write_artifact(target, write)
    for old in complete_checkpoints(job_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: Path) -> tuple[TrainState, dict]:
    """The data position and the optimizer/scheduler/RNG states of a checkpoint."""
    import torch

    state = TrainState(**json.loads((path / TRAINER_STATE_FILE).read_text()))
    extra = torch.load(path / OPTIMIZER_FILE, weights_only=True)  # never unpickle arbitrary objects
    return state, extra


def save_final(model, tokenizer, strategy_text: str, job_dir: Path, state_dict: dict | None = None) -> Path:
    target = job_dir / FINAL_DIR
    _write_artifact(target, lambda tmp: _write_weights(model, tokenizer, strategy_text, tmp, state_dict))
    return target


def save_best(model, tokenizer, strategy_text: str, job_dir: Path, state_dict: dict | None = None) -> Path:
    target = job_dir / BEST_DIR
    _write_artifact(target, lambda tmp: _write_weights(model, tokenizer, strategy_text, tmp, state_dict))
    return target
