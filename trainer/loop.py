"""The one training loop, shared by LoRA, QLoRA and full fine-tuning on every device."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from contract.job_folder import append_metrics, update_job
from contract.strategy import TrainingArgs
from trainer.data.tokenize import IGNORE_INDEX


class StopRequested(Exception):
    """SIGTERM or `llamafarm finetune stop` arrived; the loop saved a checkpoint first."""


@dataclass
class LoopResult:
    steps: int
    final_loss: float | None
    tokens_per_second: float
    elapsed: float


def _batches(rows, batch_size: int, seed: int, epoch: int):
    """Shuffled batches for one epoch; the order depends only on (seed, epoch)."""
    import torch

    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(rows), generator=g).tolist()
    return [[rows[i] for i in order[k : k + batch_size]] for k in range(0, len(order), batch_size)]


def _collate(batch, pad_id: int, device):
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention[row, : len(ids)] = 1
    return input_ids.to(device), labels.to(device), attention.to(device)


def _targets(batch) -> int:
    # The model predicts labels[1:] from positions [:-1], so the first label never counts.
    return sum(sum(label != IGNORE_INDEX for label in labs[1:]) for _, labs in batch)


def _autocast(device: str, precision: str):
    import torch

    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device, dtype=dtype)


def plan_steps(num_rows: int, args: TrainingArgs) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps)."""
    micro_batches = math.ceil(num_rows / args.per_device_train_batch_size)
    per_epoch = math.ceil(micro_batches / args.gradient_accumulation_steps)
    total = args.max_steps or math.ceil(per_epoch * args.num_train_epochs)
    return per_epoch, total


def train(
    model,
    rows,
    args: TrainingArgs,
    *,
    device: str,
    precision: str,
    pad_id: int,
    job_dir: Path,
    save_checkpoint: Callable[[int], None],
    stop_requested: Callable[[], bool],
) -> LoopResult:
    import torch
    from transformers import get_scheduler

    per_epoch, total_steps = plan_steps(len(rows), args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=round(args.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    scaler = torch.amp.GradScaler("cuda") if (device == "cuda" and precision == "fp16") else None
    update_job(job_dir, total_steps=total_steps, steps_per_epoch=per_epoch)
    print(f"training: {len(rows)} rows, {per_epoch} steps/epoch, {total_steps} steps", flush=True)

    model.train()
    start = time.perf_counter()
    step, window_loss, window_targets, window_tokens, window_start = 0, 0.0, 0, 0, start
    tokens_seen, final_loss = 0, None
    epoch = 0
    while step < total_steps:
        batches = _batches(rows, args.per_device_train_batch_size, args.seed, epoch)
        groups = [batches[i : i + args.gradient_accumulation_steps] for i in range(0, len(batches), args.gradient_accumulation_steps)]
        for group in groups:
            if step >= total_steps:
                break
            if stop_requested():
                save_checkpoint(step)
                raise StopRequested()
            step_targets = sum(_targets(b) for b in group) or 1
            for batch in group:
                input_ids, labels, attention = _collate(batch, pad_id, device)
                with _autocast(device, precision):
                    out = model(input_ids=input_ids, attention_mask=attention, labels=labels)
                # Weight each micro-batch by its share of the step's target tokens, so accumulation
                # gives the same gradient as one big batch.
                n = _targets(batch)
                loss = out.loss.float() * (n / step_targets)
                (scaler.scale(loss) if scaler else loss).backward()
                window_loss += out.loss.item() * n
                window_targets += n
                window_tokens += int(attention.sum())
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm).item()
                if args.max_grad_norm
                else None
            )
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % args.logging_steps == 0 or step == total_steps:
                now = time.perf_counter()
                final_loss = window_loss / max(window_targets, 1)
                tokens_seen += window_tokens
                record = {
                    "step": step,
                    "total_steps": total_steps,
                    "epoch": round(step / per_epoch, 4),
                    "loss": round(final_loss, 6),
                    "learning_rate": lr,
                    "grad_norm": None if grad_norm is None else round(grad_norm, 6),
                    "tokens_per_second": round(window_tokens / max(now - window_start, 1e-9), 2),
                    "elapsed": round(now - start, 3),
                }
                append_metrics(job_dir, record)
                print(
                    f"step {step}/{total_steps} loss {final_loss:.4f} lr {lr:.2e} "
                    f"{record['tokens_per_second']:.0f} tok/s",
                    flush=True,
                )
                window_loss, window_targets, window_tokens, window_start = 0.0, 0, 0, now
            if args.save_steps and step % args.save_steps == 0 and step < total_steps:
                save_checkpoint(step)
        epoch += 1
    elapsed = time.perf_counter() - start
    return LoopResult(step, final_loss, tokens_seen / max(elapsed, 1e-9), elapsed)
