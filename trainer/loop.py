"""The one training loop, shared by LoRA, QLoRA and full fine-tuning on every device."""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from contract.job_folder import update_job
from contract.strategy import TrainingArgs
from trainer import heap, performance
from trainer.chunked_loss import forward_loss as chunked_loss_forward
from trainer.data.batching import collate, pack, sequence_length
from trainer.devices import core_wait_share, scheduler_snapshot
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
    core_wait: float | None = None
    """Share of the run this process waited for a core other programs held (trainer.devices.core_wait_share)."""


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
        return chunked_loss_forward(model, **inputs) if chunked_loss else model(**inputs)


def evaluate_loss(model, rows, batch_size: int, pad_id: int, device: str, precision: str,
                  chunked_loss: bool = False, pack_to: int | None = None) -> float:
    """Mean loss per target token over `rows`, with no gradient.

    pack_to: put the rows end to end in sequences of up to this many tokens under the block-diagonal
    mask, for a model whose attention takes it (contract/decisions.py block_mask), so no forward pass
    computes padding; each row sees only itself either way, so the mean is over the same target tokens
    with the same logits (to rounding). Else one row per sequence under a padding mask."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    sequences = make_sequences(rows, pack_to or 0, bool(pack_to), seed=0)
    with torch.no_grad(), performance.eager():
        for k in range(0, len(sequences), batch_size):
            batch = collate(sequences[k : k + batch_size], pad_id, bool(pack_to), torch.float32)
            out = _forward(model, batch, device, precision, chunked_loss)
            total += out.loss.float().item() * batch.target_tokens
            count += batch.target_tokens
    model.train(was_training)
    return total / max(count, 1)


@dataclass
class TokenObjective:
    """Next-token loss on the answer tokens (method.stage sft); trainer/preference.py has the others."""

    pad_id: int
    block_mask: bool  # contract/decisions.py block_mask
    device: str
    precision: str
    chunked_loss: bool = False
    eval_pack_to: int | None = None
    """Evaluation rows packed into sequences of this many tokens (evaluate_loss pack_to): the training
    batches' block_mask and max_seq_length."""

    def units(self, batch) -> int:
        """The loss is a mean over target tokens, so accumulation weighs micro-batches by them."""
        return batch.target_tokens

    def collate(self, sequences):
        import torch

        return collate(sequences, self.pad_id, self.block_mask, torch.float32)

    def loss(self, model, batch):
        out = _forward(model, batch, self.device, self.precision, self.chunked_loss)
        return out.loss.float(), {}

    def evaluate(self, model, rows, batch_size: int) -> dict:
        loss = evaluate_loss(model, rows, batch_size, self.pad_id, self.device, self.precision, self.chunked_loss,
                             self.eval_pack_to)
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


@dataclass
class Fit:
    """What one training run works with: the model (wrapped, in a distributed world), its data, the
    strategy's training_args, the objective (batches, loss, eval), where it reports and saves."""

    model: object
    sequences: list
    eval_rows: list
    args: TrainingArgs
    objective: object
    """TokenObjective (method.stage sft) or trainer/preference.py's PreferenceObjective."""
    device: str
    precision: str
    packed: bool
    """Sequences hold several rows (block-diagonal attention); batches are formed by length groups."""
    job_dir: Path
    hooks: Hooks
    sink: object
    world: World = field(default_factory=World)
    fused_optimizer: bool = False
    """AdamW's fused kernel (trainer.performance.choose_optimizer)."""


class _Window:
    """Loss, target units, tokens and the objective's metrics since the last logged step."""

    def __init__(self, started: float) -> None:
        self.loss, self.units, self.tokens, self.metrics, self.started = 0.0, 0, 0, {}, started

    def add(self, batch_loss: float, units: int, tokens: int, metrics: dict) -> None:
        from trainer.preference import add_metrics

        self.loss += batch_loss * units
        self.units += units
        self.tokens += tokens
        add_metrics(self.metrics, metrics)


class _Run:
    """One run of the loop: optimizer, schedule and the step, log, eval and checkpoint around it."""

    def __init__(self, fit: Fit) -> None:
        import torch
        from transformers import get_scheduler

        self.fit, args = fit, fit.args
        self.per_epoch, self.total_steps = plan_steps(len(fit.sequences), args, fit.world.size)
        self.trainable = [p for p in fit.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=args.learning_rate, weight_decay=args.weight_decay,
                                           betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                                           fused=fit.fused_optimizer or None)
        self.scheduler = get_scheduler(args.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=round(args.warmup_ratio * self.total_steps),
                                       num_training_steps=self.total_steps)
        fp16_on_cuda = fit.device == "cuda" and fit.precision == "fp16"
        self.scaler = torch.amp.GradScaler("cuda") if fp16_on_cuda else None
        self.state = TrainState(step=0, epoch=0, groups_done=0)

    def restore(self, resume: tuple[TrainState, dict]) -> None:
        """Continue exactly where a checkpoint was taken: optimizer, schedule, scaler and RNG."""
        self.state, extra = resume
        self.optimizer.load_state_dict(extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        if self.scaler and extra["scaler"]:
            self.scaler.load_state_dict(extra["scaler"])
        restore_rng(extra["rng"])  # last, so nothing above consumes the restored streams
        s = self.state
        print(f"resumed at step {s.step} (epoch {s.epoch}, {s.groups_done} steps into it)", flush=True)

    def checkpoint(self, step: int, epoch: int, groups_done: int, best: float | None) -> None:
        self.fit.hooks.save_checkpoint(TrainState(step, epoch, groups_done, best), self.optimizer, self.scheduler,
                                       self.scaler)

    def step(self, group: list, real: int, window: _Window) -> tuple[float | None, float]:
        """One optimizer step over this process's micro-batches; (grad norm, learning rate used)."""
        import torch

        fit, world, scaler = self.fit, self.fit.world, self.scaler
        collated = [fit.objective.collate(b) for b in group]
        step_units = int(world.sum(sum(fit.objective.units(c) for c in collated[:real]))[0]) or 1
        for i, batch in enumerate(collated):
            units = fit.objective.units(batch)
            with world.sync_gradients(fit.model, sync=i == len(collated) - 1):
                batch_loss, metrics = fit.objective.loss(fit.model, batch)
                # Weight each micro-batch by its share of the step's target tokens (pairs for
                # preference stages), so accumulation gives the same gradient as one big batch
                # (times the processes, whose gradients DDP/FSDP average).
                loss = batch_loss * (world.size * units / step_units if i < real else 0.0)
                (scaler.scale(loss) if scaler else loss).backward()
            if i < real:
                window.add(batch_loss.item(), units, batch.real_tokens, metrics)
        if scaler:
            scaler.unscale_(self.optimizer)
        max_norm = fit.args.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm).item() if max_norm else None
        if scaler:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, lr

    def log(self, step: int, window: _Window, grad_norm, lr: float, start: float) -> tuple[float, int]:
        """Write the window's record; (its mean loss, its real tokens)."""
        from trainer.preference import mean_metrics

        now = time.perf_counter()
        loss_sum, units, tokens = self.fit.world.sum(window.loss, window.units, window.tokens)
        units, tokens = int(units), int(tokens)
        mean_loss = loss_sum / max(units, 1)
        record = {
            "step": step,
            "total_steps": self.total_steps,
            "epoch": round(step / self.per_epoch, 4),
            "loss": round(mean_loss, 6),
            "learning_rate": lr,
            "grad_norm": None if grad_norm is None else round(grad_norm, 6),
            "tokens_per_second": round(tokens / max(now - window.started, 1e-9), 2),
            "elapsed": round(now - start, 3),
        }
        # Preference stages run in one process (the schema refuses distributed), so no world.sum.
        record.update({k: v for k, v in mean_metrics(window.metrics).items() if k != "loss"})
        self.fit.sink.log(record)
        print(f"step {step}/{self.total_steps} loss {mean_loss:.4f} lr {lr:.2e} "
              f"{record['tokens_per_second']:.0f} tok/s", flush=True)
        return mean_loss, tokens

    def evaluate(self, step: int, best: float | None) -> float | None:
        """Eval loss (and the objective's metrics) logged; a new best saved when save_best is on."""
        fit = self.fit
        with heap.malloc_defaults():  # in a kept heap the evaluation's own shapes would grow it past the steps' peak
            scores = fit.objective.evaluate(fit.model, fit.eval_rows, fit.args.per_device_train_batch_size)
        loss = scores["eval_loss"]
        fit.sink.log({"step": step, "epoch": round(step / self.per_epoch, 4), **scores})
        print(f"eval at step {step}: loss {loss:.4f} " + " ".join(
            f"{k.removeprefix('eval_')} {v:.{2 if k == 'eval_perplexity' else 4}f}" for k, v in scores.items()
            if k != "eval_loss"), flush=True)
        if not (best is None or loss < best):
            return best
        if fit.args.save_best:
            fit.hooks.save_best(step)
            if fit.world.writes:
                update_job(fit.job_dir, best_eval_loss=round(loss, 6), best_step=step)
        return loss

    def eval_due(self, step: int) -> bool:
        args = self.fit.args
        if not self.fit.eval_rows:
            return False
        if args.eval_steps:
            return step % args.eval_steps == 0 or step == self.total_steps
        return step % self.per_epoch == 0 or step == self.total_steps


def train(fit: Fit, resume: tuple[TrainState, dict] | None = None) -> LoopResult:
    """Train to the planned step count. With `resume` (a checkpoint's state), continue exactly where
    it was taken: same weights (loaded by the caller), optimizer, schedule, RNG and data position.
    With a distributed world, `fit.model` is the wrapped model and this process trains on its share."""
    run, args, world = _Run(fit), fit.args, fit.world
    if world.writes:
        update_job(fit.job_dir, total_steps=run.total_steps, steps_per_epoch=run.per_epoch)
    print(f"training: {len(fit.sequences)} sequences, {run.per_epoch} steps/epoch, {run.total_steps} steps", flush=True)
    if resume:
        run.restore(resume)
    fit.model.train()
    cores_before = scheduler_snapshot()
    run_start = time.perf_counter()
    # Records carry the job's training time, which runs on across resumes (monitor's elapsed and ETA).
    start = run_start - (elapsed_before(fit.job_dir, run.state.step) if resume else 0.0)
    step, best, epoch, skip = run.state.step, run.state.best_eval_loss, run.state.epoch, run.state.groups_done
    window, tokens_seen, final_loss = _Window(run_start), 0, None
    while step < run.total_steps:
        batches = _epoch_batches(fit.sequences, args.per_device_train_batch_size, args.seed, epoch, fit.packed)
        for done, (group, real) in enumerate(_step_groups(batches, args.gradient_accumulation_steps, world)):
            if done < skip:
                continue  # taken before the checkpoint we resumed from
            if step >= run.total_steps:
                break
            if world.any(fit.hooks.stop_requested()):  # every process stops at the same step
                run.checkpoint(step, epoch, done, best)
                raise StopRequested()
            grad_norm, lr = run.step(group, real, window)
            step += 1
            if step % args.logging_steps == 0 or step == run.total_steps:
                final_loss, tokens = run.log(step, window, grad_norm, lr, start)
                tokens_seen += tokens
                window = _Window(time.perf_counter())
            if run.eval_due(step):
                best = run.evaluate(step, best)
            if args.save_steps and step % args.save_steps == 0 and step < run.total_steps:
                run.checkpoint(step, epoch, done + 1, best)
        epoch, skip = epoch + 1, 0
    elapsed = time.perf_counter() - run_start
    return LoopResult(step, final_loss, tokens_seen / max(elapsed, 1e-9), elapsed, tokens_seen,
                      core_wait_share(cores_before))


def elapsed_before(job_dir: Path, resume_step: int) -> float:
    """Training time spent up to the checkpoint a run resumes from: the last record at or before it."""
    from contract.job_folder import read_metrics

    times = [r["elapsed"] for r in read_metrics(job_dir) if "elapsed" in r and r.get("step", 0) <= resume_step]
    return times[-1] if times else 0.0
