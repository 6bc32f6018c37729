"""The one training loop, shared by LoRA, QLoRA and full fine-tuning on every device."""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from contract.job_folder import update_job
from contract.strategy import TrainingArgs
from trainer import performance
from trainer.data.batching import collate, pack, sequence_length
from trainer.distributed import World
from trainer.lifecycle import Stopped
from trainer.saving import TrainState, restore_rng


class StopRequested(Stopped):
    """SIGTERM or `llamafarm finetune stop` arrived; the loop saved a checkpoint first."""


@dataclass
class LoopResult:
    steps: int
    final_loss: float | None
    tokens_per_second: float
    elapsed: float
    tokens: int


@dataclass
class Hooks:
    save_checkpoint: Callable[..., None]  # (TrainState, optimizer, scheduler, scaler)
    save_best: Callable[[int], None]
    stop_requested: Callable[[], bool]


def make_sequences(rows, max_len: int, packed: bool, seed: int) -> list[list]:
    """Training sequences, fixed for the whole run: rows packed together, or one row each."""
    if not packed:
        return [[row] for row in rows]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [[rows[i] for i in group] for group in pack(rows, max_len, order)]


def padding_fraction(sequences, batch_size: int, seed: int = 0, packed: bool = False) -> float:
    """Share of positions that are padding in the first epoch's batches (for the log)."""
    real = total = 0
    for batch in _epoch_batches(sequences, batch_size, seed, 0, packed):
        lengths = [sequence_length(seq) for seq in batch]
        real += sum(lengths)
        total += max(lengths) * len(lengths)
    return 1 - real / max(total, 1)


# Packed batches are formed within groups of this many batches in shuffled order, sorted by length.
LENGTH_GROUP_BATCHES = 16


def _epoch_batches(sequences, batch_size: int, seed: int, epoch: int, packed: bool = False):
    """Shuffled batches for one epoch; the order depends only on (seed, epoch).

    Packed: sequences are nearly full except those holding one long row, and a batch pads to its
    longest; so within each group of LENGTH_GROUP_BATCHES batches' worth of shuffled sequences, batches
    are cut from the group sorted by length, and the group's batches then go in shuffled order."""
    import torch

    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(sequences), generator=g).tolist()
    if packed:
        group = LENGTH_GROUP_BATCHES * batch_size
        grouped = []
        for k in range(0, len(order), group):
            chunk = sorted(order[k : k + group], key=lambda i: -sequence_length(sequences[i]))
            cut = [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
            grouped += [cut[j] for j in torch.randperm(len(cut), generator=g).tolist()]
        return [[sequences[i] for i in batch] for batch in grouped]
    return [[sequences[i] for i in order[k : k + batch_size]] for k in range(0, len(order), batch_size)]


def _autocast(device: str, precision: str):
    import torch

    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device, dtype=dtype)


def plan_steps(num_sequences: int, args: TrainingArgs, world_size: int = 1) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps); a step takes micro-batches from every process."""
    micro_batches = math.ceil(num_sequences / args.per_device_train_batch_size)
    per_epoch = math.ceil(micro_batches / (args.gradient_accumulation_steps * world_size))
    total = args.max_steps or math.ceil(per_epoch * args.num_train_epochs)
    return per_epoch, total


def _forward(model, batch, device: str, precision: str, chunked_loss: bool = False):
    inputs = dict(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        position_ids=batch.position_ids.to(device),
        labels=batch.labels.to(device),
    )
    with _autocast(device, precision):
        # chunked_loss: decided by trainer.performance.choose_chunked_loss
        return performance.forward_loss(model, **inputs) if chunked_loss else model(**inputs)


def evaluate_loss(model, rows, batch_size: int, pad_id: int, device: str, precision: str,
                  chunked_loss: bool = False) -> float:
    """Mean loss per target token over `rows`, with no gradient."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), performance.eager():
        for k in range(0, len(rows), batch_size):
            batch = collate([[r] for r in rows[k : k + batch_size]], pad_id, packed=False)
            out = _forward(model, batch, device, precision, chunked_loss)
            total += out.loss.float().item() * batch.target_tokens
            count += batch.target_tokens
    model.train(was_training)
    return total / max(count, 1)


@dataclass
class TokenObjective:
    """Next-token loss on the answer tokens (method.stage sft); trainer/preference.py has the others."""

    pad_id: int
    packed: bool
    device: str
    precision: str
    chunked_loss: bool = False

    def units(self, batch) -> int:
        """The loss is a mean over target tokens, so accumulation weighs micro-batches by them."""
        return batch.target_tokens

    def collate(self, sequences):
        import torch

        return collate(sequences, self.pad_id, self.packed, torch.float32)

    def loss(self, model, batch):
        out = _forward(model, batch, self.device, self.precision, self.chunked_loss)
        return out.loss.float(), {}

    def evaluate(self, model, rows, batch_size: int) -> dict:
        loss = evaluate_loss(model, rows, batch_size, self.pad_id, self.device, self.precision, self.chunked_loss)
        return {"eval_loss": round(loss, 6), "eval_perplexity": round(math.exp(min(loss, 50)), 4)}


def _step_groups(batches: list, accum: int, world: World) -> list[tuple[list, int]]:
    """(micro-batches, how many of them are real) for each optimizer step of an epoch, for this process.

    A step takes the next accum x processes micro-batches of the epoch's order and deals them to the
    processes in turn, so it sees the same rows for any number of processes with the same global batch
    (per_device_train_batch_size x gradient_accumulation_steps x processes). At an epoch's ragged end a
    process may be dealt fewer: it pads with copies of the step's first micro-batch that get weight 0,
    because every process must run the same number of forward and backward passes."""
    per_step = accum * world.size
    groups = []
    for i in range(0, len(batches), per_step):
        step = batches[i : i + per_step]
        mine = step[world.rank :: world.size]
        groups.append((mine + [step[0]] * (math.ceil(len(step) / world.size) - len(mine)), len(mine)))
    return groups


def train(model, sequences, eval_rows, args: TrainingArgs, *, device: str, precision: str, packed: bool,
          pad_id: int, job_dir: Path, hooks: Hooks, sink, resume: tuple[TrainState, dict] | None = None,
          chunked_loss: bool = False, world: World | None = None, objective=None) -> LoopResult:
    """Train to the planned step count. With `resume` (a checkpoint's state), continue exactly where
    it was taken: same weights (loaded by the caller), optimizer, schedule, RNG and data position.
    With a distributed `world`, `model` is the wrapped model and this process trains on its share.
    `objective` gives the batches, the loss and the eval (default: next-token loss, TokenObjective)."""
    import torch
    from transformers import get_scheduler

    from trainer.preference import add_metrics, mean_metrics

    world = world or World()
    objective = objective or TokenObjective(pad_id, packed, device, precision, chunked_loss)
    per_epoch, total_steps = plan_steps(len(sequences), args, world.size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=round(args.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    scaler = torch.amp.GradScaler("cuda") if (device == "cuda" and precision == "fp16") else None
    if world.writes:
        update_job(job_dir, total_steps=total_steps, steps_per_epoch=per_epoch)
    print(f"training: {len(sequences)} sequences, {per_epoch} steps/epoch, {total_steps} steps", flush=True)

    def run_eval(step: int, best: float | None) -> float | None:
        scores = objective.evaluate(model, eval_rows, args.per_device_train_batch_size)
        loss = scores["eval_loss"]
        record = {"step": step, "epoch": round(step / per_epoch, 4), **scores}
        sink.log(record)
        print(f"eval at step {step}: loss {loss:.4f} " + " ".join(
            f"{k.removeprefix('eval_')} {v:.{2 if k == 'eval_perplexity' else 4}f}" for k, v in scores.items()
            if k != "eval_loss"), flush=True)
        if best is None or loss < best:
            if args.save_best:
                hooks.save_best(step)
                if world.writes:
                    update_job(job_dir, best_eval_loss=round(loss, 6), best_step=step)
            return loss
        return best

    state = TrainState(step=0, epoch=0, groups_done=0)
    if resume:
        state, extra = resume
        optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        if scaler and extra["scaler"]:
            scaler.load_state_dict(extra["scaler"])
        restore_rng(extra["rng"])  # last, so nothing above consumes the restored streams
        print(f"resumed at step {state.step} (epoch {state.epoch}, {state.groups_done} steps into it)", flush=True)

    def checkpoint(epoch: int, groups_done: int) -> None:
        hooks.save_checkpoint(TrainState(step, epoch, groups_done, best), optimizer, scheduler, scaler)

    model.train()
    run_start = time.perf_counter()
    # Records carry the job's training time, which runs on across resumes (monitor's elapsed and ETA).
    start = run_start - (elapsed_before(job_dir, state.step) if resume else 0.0)
    step, best = state.step, state.best_eval_loss
    window_loss, window_targets, window_tokens, window_start = 0.0, 0, 0, run_start
    window_metrics: dict = {}  # the objective's own metrics (e.g. preference rewards), summed
    tokens_seen, final_loss = 0, None
    epoch, skip = state.epoch, state.groups_done
    while step < total_steps:
        batches = _epoch_batches(sequences, args.per_device_train_batch_size, args.seed, epoch, packed)
        groups = _step_groups(batches, args.gradient_accumulation_steps, world)
        for done, (group, real) in enumerate(groups):
            if done < skip:
                continue  # taken before the checkpoint we resumed from
            if step >= total_steps:
                break
            if world.any(hooks.stop_requested()):  # every process stops at the same step
                checkpoint(epoch, done)
                raise StopRequested()
            collated = [objective.collate(b) for b in group]
            step_targets = int(world.sum(sum(objective.units(c) for c in collated[:real]))[0]) or 1
            for i, batch in enumerate(collated):
                units = objective.units(batch)
                with world.sync_gradients(model, sync=i == len(collated) - 1):
                    batch_loss, metrics = objective.loss(model, batch)
                    # Weight each micro-batch by its share of the step's target tokens (pairs for
                    # preference stages), so accumulation gives the same gradient as one big batch
                    # (times the processes, whose gradients DDP/FSDP average).
                    weight = world.size * units / step_targets if i < real else 0.0
                    loss = batch_loss * weight
                    (scaler.scale(loss) if scaler else loss).backward()
                if i < real:
                    window_loss += batch_loss.item() * units
                    window_targets += units
                    window_tokens += batch.real_tokens
                    add_metrics(window_metrics, metrics)
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm).item() if args.max_grad_norm else None
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
                window_loss, window_targets, window_tokens = world.sum(window_loss, window_targets, window_tokens)
                window_targets, window_tokens = int(window_targets), int(window_tokens)
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
                # Preference stages run in one process (the schema refuses distributed), so no world.sum.
                record.update({k: v for k, v in mean_metrics(window_metrics).items() if k != "loss"})
                window_metrics = {}
                sink.log(record)
                print(f"step {step}/{total_steps} loss {final_loss:.4f} lr {lr:.2e} "
                      f"{record['tokens_per_second']:.0f} tok/s", flush=True)
                window_loss, window_targets, window_tokens, window_start = 0.0, 0, 0, now
            if eval_rows:
                at_epoch_end = step % per_epoch == 0
                if (args.eval_steps and step % args.eval_steps == 0) or (not args.eval_steps and at_epoch_end) \
                        or step == total_steps:
                    best = run_eval(step, best)
            if args.save_steps and step % args.save_steps == 0 and step < total_steps:
                checkpoint(epoch, done + 1)
        epoch, skip = epoch + 1, 0
    elapsed = time.perf_counter() - run_start
    return LoopResult(step, final_loss, tokens_seen / max(elapsed, 1e-9), elapsed, tokens_seen)


def elapsed_before(job_dir: Path, resume_step: int) -> float:
    """Training time spent up to the checkpoint a run resumes from: the last record at or before it."""
    from contract.job_folder import read_metrics

    times = [r["elapsed"] for r in read_metrics(job_dir) if "elapsed" in r and r.get("step", 0) <= resume_step]
    return times[-1] if times else 0.0
