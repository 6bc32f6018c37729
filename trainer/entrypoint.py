"""The shared training entrypoint: every runner ends here with a job folder.

    python -m trainer train <job_dir>

It reads only the job folder (strategy.yaml and the inputs in job.json), prints each decision with
its reason, trains, and writes status, metrics, checkpoints and final weights back into the folder.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from contract.decisions import Decision, block_mask, choose_attention, choose_base_dtype
from contract.errors import UserError
from contract.job_folder import (
    complete_checkpoints,
    cut_metrics,
    read_job,
    read_job_strategy,
    update_job,
)
from contract.plan import estimate_of, kept_decision, plan_of
from trainer.lifecycle import run_job


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _print_decision(what: str, decision) -> dict:
    print(f"{what}: {decision.value} ({decision.reason})", flush=True)
    return {"value": decision.value, "reason": decision.reason}


def _resume_point(folder: Path, job: dict, world=None):
    """(checkpoint path, TrainState, optimizer/RNG states) when this run resumes, else None.

    metrics.jsonl is cut back to the checkpoint's step, so the resumed run's records follow on.
    In a distributed job each process takes its own RNG states, and only the writer cuts metrics."""
    from trainer import saving

    if not job.get("resume_from"):
        return None
    path = folder / job["resume_from"]
    if path not in complete_checkpoints(folder):
        raise UserError(f"checkpoint {path} is missing or incomplete; `llamafarm finetune resume` picks a complete one")
    state, extra = saving.load_checkpoint(path)
    if world and world.active:
        by_rank = extra.get("rng_by_rank") or []
        if len(by_rank) == world.size:
            extra["rng"] = by_rank[world.rank]
        else:
            print(f"resume: the checkpoint holds RNG states of {len(by_rank) or 1} processes, this job runs "
                  f"{world.size}; every process continues from the saved rank-0 streams", flush=True)
    if world is None or world.writes:
        cut_metrics(folder, state.step)
    print(f"resume: from {path.name}", flush=True)
    return path, state, extra


def choose_packing(setting, model, stage: str = "sft"):
    """Packing needs attention that honours a 4-D mask; FlashAttention-style kernels do not."""
    if stage != "sft":  # the schema refuses packing: true here
        return Decision("off", f"method.stage {stage}: a chosen and a rejected answer never share a sequence")
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    supported = impl in ("sdpa", "eager")
    if setting is False:
        return Decision("off", "set in the strategy")
    if setting is True and not supported:
        raise UserError(f"dataset.packing: true needs sdpa or eager attention, but the model uses {impl}; set packing: auto")
    if not supported:
        return Decision("off", f"auto; {impl} attention does not take block-diagonal masks")
    if setting is True:
        return Decision("on", "set in the strategy")
    return Decision("on", f"auto; block-diagonal masks, which the model's {impl} attention and the kernels of "
                          "the attention decision take")


def _reference_model(model, stage: str, method: str, device: str, decisions: dict):
    """DPO and KTO compare with the base: with LoRA the adapter is switched off (no copy); full
    fine-tuning keeps a frozen copy, which `estimate` counts. ORPO and SFT need none."""
    if stage not in ("dpo", "kto"):
        return None
    if method != "full":
        decisions["reference"] = _print_decision("reference model", Decision("base with the adapter off", f"{method}: no copy"))
        return None
    import copy

    ref = copy.deepcopy(model).to(device).eval()
    ref.requires_grad_(False)
    decisions["reference"] = _print_decision("reference model", Decision("frozen copy", "full fine-tuning changes every weight"))
    return ref


def _check_architecture(model_path: str, spec) -> None:
    """Refuse, before any weights load, a model family that export could not write and verify."""
    from transformers import AutoConfig

    from trainer.export.architectures import architecture_of

    config = AutoConfig.from_pretrained(model_path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    name, arch = architecture_of(config.to_dict())
    print(f"architecture: {name} (family {arch.family}; GGUF architecture {arch.name})", flush=True)


@dataclass
class _Job:
    """What the steps of one training run share: the job folder read once, the plan confirmed here,
    and the decisions recorded so far."""

    folder: Path
    strategy_text: str
    cfg: object
    job: dict
    device: Decision
    method: Decision
    world: object
    precision: Decision | None = None
    """Decided once the model's shape is known (`_decide_precision`)."""
    decisions: dict = field(default_factory=dict)
    trainable_parameters: int = 0

    @property
    def args(self):
        return self.cfg.training_args

    def decide(self, name: str, decision: Decision, label: str | None = None) -> Decision:
        """Print a decision with its reason and keep it for job.json."""
        self.decisions[name] = _print_decision(label or name.replace("_", " "), decision)
        return decision

    def keep_or_decide(self, name: str, decide, applies: bool = True) -> Decision:
        """When this run resumes one and `applies` (the setting is left to auto), that run's decision
        `name`, where it changes the arithmetic (the thread count, a measured precision, the compile):
        deciding again on a machine busier or quieter than then could pick another, and the resumed steps
        would no longer end bitwise identical to a run never interrupted. Else `decide()`."""
        kept = self.kept_on_resume(name) if applies else None
        return kept if kept is not None else decide()

    def kept_on_resume(self, name: str) -> Decision | None:
        """The decision `name` recorded by the run this one resumes (contract.plan.kept_decision, which
        refuses a record it could not compute with); None for a fresh run, or when it recorded none."""
        return kept_decision(self.folder, self.job, name) if self.job.get("resume_from") else None

    def record(self, **fields) -> None:
        if self.world.writes:  # one writer per job folder
            update_job(self.folder, **fields)


def _train(folder: Path, stop_flag) -> None:
    """Open the job, load its tokenizer, data and model, decide the speed levers, fit, save, measure."""
    run = _open(folder)
    model_path, tokenizer, template = _load_tokenizer(run)
    _decide_precision(run, model_path)
    data = _load_data(run, tokenizer, template)
    resume = _resume_point(folder, run.job, run.world)
    model, ref_model = _load_model(run, model_path, resume)
    tokenizer.chat_template = template.jinja  # every saved artifact carries the template the data was shaped with
    levers = _decide_levers(run, model)
    sequences = _sequences(run, data, levers.packed)
    result = _fit(run, model, ref_model, tokenizer, data, sequences, levers, resume, stop_flag)
    _measure(run, result)
    run.world.close()


def _open(folder: Path) -> _Job:
    """The job folder read once; the plan's device confirmed in this process."""
    from trainer import distributed
    from trainer.devices import confirm_device

    strategy, strategy_text = read_job_strategy(folder)
    job = read_job(folder)
    plan = plan_of(job)  # device, method and layout as `start` decided them
    for line in plan.lines():
        print(f"plan: {line}", flush=True)
    device = confirm_device(plan.device)
    cfg = strategy.cfg
    world = distributed.join(cfg.distributed, device.value, plan.distributed)
    run = _Job(folder, strategy_text, cfg, job, device, plan.method, world)
    _seed_everything(cfg.training_args.seed)
    return run


def _decide_precision(run: _Job, model_path) -> None:
    """On a CPU, auto is measured on the model's own matmul shape, so it waits for the model's config."""
    from transformers import AutoConfig

    from trainer.devices import choose_precision

    base = run.cfg.base_model
    config = AutoConfig.from_pretrained(model_path, revision=base.revision, trust_remote_code=base.trust_remote_code)
    config = getattr(config, "text_config", None) or config
    # Local rank 0 measures and caches the rates; the other processes read them, so every rank decides alike.
    def measure() -> Decision:
        with run.world.local_first():
            return choose_precision(run.args.precision, run.device.value, config)

    run.precision = run.decide("precision", run.keep_or_decide("precision", measure, run.args.precision == "auto"))


def _load_tokenizer(run: _Job):
    """(model path, tokenizer, chat template): the base model resolved (built on first use), checked
    for an architecture export can write, and the template chosen."""
    from transformers import AutoTokenizer

    from inputs.models.source import check_available
    from trainer.data.tokenize import choose_template
    from trainer.models import source

    base = run.cfg.base_model
    print(f"base model: {base.name} = {base.huggingface_id} ({check_available(base)})", flush=True)
    with run.world.local_first():
        model_path = source.resolve(base)
    _check_architecture(model_path, base)
    if base.trust_remote_code:
        print("trust_remote_code: on (set in the strategy): the model repo's own code will run", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=base.revision, trust_remote_code=base.trust_remote_code)
    template, template_reason = choose_template(run.cfg.dataset.template, tokenizer)
    print(template_reason, flush=True)
    run.decisions["template"] = {"value": template.name, "reason": template_reason}
    return model_path, tokenizer, template


def _load_data(run: _Job, tokenizer, template):
    """Train and eval rows as tokens (SFT conversations or preference items), with what was dropped."""
    from trainer.data.prepare import prepare

    job, cfg, args = run.job, run.cfg, run.args
    eval_file = Path(job["eval_dataset"]) if job.get("eval_dataset") else None
    with run.world.local_first():
        if cfg.method.stage != "sft":
            from trainer.data.preference import prepare_preference

            data = prepare_preference(Path(job["dataset"]), cfg, tokenizer, template, eval_file)
        else:
            data = prepare(Path(job["dataset"]), cfg, tokenizer, template, eval_file)
    stats = data.stats
    for warning in stats.warnings:
        print(warning, flush=True)
    print(
        f"data: {stats.rows} rows read, {len(data.train)} for training, {len(data.eval)} for eval; "
        f"{stats.truncated} truncated, {stats.dropped_too_long} dropped as longer than {args.max_seq_length} tokens, "
        f"{stats.dropped_no_target} dropped with no answer tokens"
        + (f", plain text as {stats.text_blocks} blocks of up to {args.max_seq_length} tokens" if stats.text_blocks else "")
        + f"; {stats.tokens} of {stats.source_tokens} tokens trained ({stats.share_trained:.0%}), "
        f"{stats.target_tokens} in the loss"
        + ("; tokenized rows from cache" if data.cache_hit else ""),
        flush=True,
    )
    return data


def _load_model(run: _Job, model_path: str, resume):
    """(trainable model on the device, the reference model for DPO/KTO or None), resumed weights included."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.methods import METHODS

    cfg, method = run.cfg, run.method.value
    base_dtype = run.decide("base_weights", choose_base_dtype(method, run.precision.value))
    load_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[base_dtype.value]
    builder = METHODS[method]
    resume_path = resume[0] if resume else None
    model = AutoModelForCausalLM.from_pretrained(
        resume_path if (resume and method == "full") else model_path,
        revision=cfg.base_model.revision,
        trust_remote_code=cfg.base_model.trust_remote_code,
        dtype=load_dtype,
        use_safetensors=True,
        **builder.load_kwargs(cfg.method, load_dtype),
    )
    ref_model = _reference_model(model, cfg.method.stage, method, run.device.value, run.decisions)
    if run.args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    method_spec = cfg.method
    if method != "full":
        from trainer.methods import resolve_targets

        targets = resolve_targets(model, cfg.method)  # checked where the model is known; the schema only has names
        run.decide("target_modules", Decision(", ".join(targets.value), targets.reason))
        method_spec = cfg.method.model_copy(update={"target_modules": targets.value})
    model = builder.make_trainable(model, method_spec, resume_path if method != "full" else None)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if method != "qlora":
        model.to(run.device.value)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)", flush=True)
    run.trainable_parameters = trainable  # recorded with the data counts, in one write
    return model, ref_model


@dataclass(frozen=True)
class _Levers:
    """The speed levers the loop itself needs (the others act on the model when decided)."""

    packed: bool
    block_mask: bool  # contract/decisions.py block_mask: the form of the training batches' attention mask
    adapter_inputs: Decision
    chunked_loss: bool
    fused_optimizer: bool


def _decide_levers(run: _Job, model) -> _Levers:
    """Packing, attention kernel, adapter inputs, chunked loss, optimizer, threads, the attention's softmax,
    LoRA dropout, the layer kernel and heap for this model on this device (trainer/performance.py, trainer/heap.py); the compile
    waits for the first batch (`_decide_compile`)."""
    from trainer import distributed, heap, performance

    args, device, precision = run.args, run.device.value, run.precision.value
    packed = run.decide("packing", choose_packing(run.cfg.dataset.packing, model, run.cfg.method.stage)).value == "on"
    attention = run.decide("attention", choose_attention(
        device, model.config, args.per_device_train_batch_size, args.max_seq_length, precision))
    performance.use_attention(model, attention)
    adapter_inputs = run.decide("adapter_inputs", performance.choose_adapter_inputs(run.method.value, precision))
    chunked_loss = performance.choose_chunked_loss(model)
    if run.world.active and chunked_loss.value == "on":
        chunked_loss = distributed.NO_CHUNKED_LOSS
    if run.cfg.method.stage != "sft" and chunked_loss.value == "on":
        chunked_loss = Decision("on", f"method.stage {run.cfg.method.stage}: the answers' log-probabilities from the "
                                      "output layer in chunks over answer positions only, for the policy and the "
                                      "reference; the full logits are never built")
    run.decide("chunked_loss", chunked_loss)
    optimizer = run.decide("optimizer", performance.choose_optimizer(device, run.world.mode))
    run.decide("threads", performance.use_threads(run.keep_or_decide("threads", performance.choose_threads)))
    # Measured with the thread count just decided.
    softmax = run.decide("attention_softmax", performance.use_attention_softmax(run.keep_or_decide(
        "attention_softmax", lambda: performance.choose_attention_softmax(
            attention.value, model.config, precision, args.max_seq_length, run.world))))
    sequence = run.decide("sequence_kernel", performance.use_sequence_kernel(run.keep_or_decide(
        "sequence_kernel", lambda: performance.choose_sequence_kernel(
            attention.value, model.config, precision, args.max_seq_length, run.world))))
    # Measured against the blockwise kernel with the softmax and the kernel per sequence just decided.
    run.decide("attention_segments", performance.use_attention_segments(run.keep_or_decide(
        "attention_segments", lambda: performance.choose_attention_segments(
            attention.value, model.config, precision, args.max_seq_length, args.per_device_train_batch_size,
            softmax.value, sequence.value, run.world))))
    run.decide("lora_dropout", performance.use_lora_dropout(model, run.keep_or_decide(
        "lora_dropout", lambda: performance.choose_lora_dropout(
            run.method.value, run.cfg.method.dropout, device, model.config.hidden_size, run.world))))
    run.decide("layer_kernel", performance.use_layer_kernel(model, run.keep_or_decide(
        "layer_kernel", lambda: performance.choose_layer_kernel(model, device, run.world))))
    run.decide("heap", heap.keep_freed_memory(device))
    return _Levers(packed, block_mask(packed, attention.value), adapter_inputs, chunked_loss.value == "on",
                   optimizer.value == "adamw-fused")


def _sequences(run: _Job, data, packed: bool) -> list:
    """What the loop batches: SFT rows packed or one per sequence; preference items as they are."""
    from trainer import loop

    args, stats = run.args, data.stats
    padding = None
    if run.cfg.method.stage != "sft":
        sequences = data.train
    else:
        sequences = loop.make_sequences(data.train, args.max_seq_length, packed, args.seed)
        padding = loop.padding_fraction(sequences, args.per_device_train_batch_size, args.seed, packed)
        print(f"padding: {100 * padding:.1f}% of positions ({len(data.train)} rows in {len(sequences)} sequences)",
              flush=True)
    run.record(
        decisions=run.decisions,
        trainable_parameters=run.trainable_parameters,
        data={"rows": stats.rows, "train": len(data.train), "eval": len(data.eval), "truncated": stats.truncated,
              "dropped": stats.dropped_too_long + stats.dropped_no_target, "tokens": stats.tokens,
              "sequences": len(sequences), "padding_fraction": None if padding is None else round(padding, 4),
              "cache_hit": data.cache_hit},
    )
    return sequences


def _fit(run: _Job, model, ref_model, tokenizer, data, sequences, levers: _Levers, resume, stop_flag):
    """The loop over the (wrapped) model, saving checkpoints, the best and the final weights."""
    import torch

    from trainer import distributed, loop, performance, saving
    from trainer.reporting import MetricsSink

    args, world, folder, device, precision = run.args, run.world, run.folder, run.device.value, run.precision.value

    def checkpoint(state, optimizer, scheduler, scaler) -> None:
        if world.mode == "fsdp":  # the schema refuses save_steps with fsdp; this is a stop
            print("checkpoint: none (not supported with distributed.mode fsdp); the job cannot be resumed", flush=True)
            return
        rng_by_rank = world.gather(saving.rng_state()) if world.active else None
        if world.writes:  # DDP: every process holds the same weights and optimizer state
            path = saving.save_checkpoint(model, tokenizer, run.strategy_text, folder, state, optimizer, scheduler,
                                          scaler, args.save_total_limit, rng_by_rank)
            print(f"checkpoint: {path}", flush=True)

    def best(step: int) -> None:
        weights = world.full_state_dict(model)  # FSDP gathers on every process
        if world.writes:
            saving.save_best(model, tokenizer, run.strategy_text, folder, weights)
            print(f"best so far at step {step}: saved to {folder / 'best'}", flush=True)

    trained = world.wrap(model, device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if run.cfg.method.stage != "sft":
        from trainer.preference import PreferenceObjective

        objective = PreferenceObjective(run.cfg.method.stage, run.cfg.method, pad_id, device,
                                        lambda: loop._autocast(device, precision), ref_model, levers.chunked_loss,
                                        levers.block_mask)
    else:
        objective = loop.TokenObjective(pad_id, levers.block_mask, device, precision, levers.chunked_loss,
                                        args.max_seq_length if levers.block_mask else None)
    if world.active:
        torch.manual_seed(args.seed + world.rank)  # dropout masks differ between processes
    with performance.adapter_inputs(model, levers.adapter_inputs):
        _decide_compile(run, model, objective, sequences)
    sink = MetricsSink(folder, args.report_to) if world.writes else distributed.NullSink()
    fit = loop.Fit(trained, sequences, data.eval, args, objective, device, precision, levers.packed, folder,
                   loop.Hooks(checkpoint, best, lambda: bool(stop_flag)), sink, world, levers.fused_optimizer)
    try:
        with performance.adapter_inputs(model, levers.adapter_inputs):
            result = loop.train(fit, resume[1:] if resume else None)
    finally:
        sink.close()
    weights = world.full_state_dict(model)
    if world.writes:
        final = saving.save_final(model, tokenizer, run.strategy_text, folder, weights)
        print(f"final weights: {final}", flush=True)
    return result


def _decide_compile(run: _Job, model, objective, sequences) -> None:
    """torch.compile of the decoder layers, from this machine's measured gain for this step
    (trainer/compile_probe.py), measured now on the first batch when it is missing and the run is long."""
    from trainer import compile_probe, performance

    args = run.args
    estimate = estimate_of(run.job)
    # Training time only: evaluation runs eager, so compiling does not shorten it.
    train_estimate = (estimate["seconds"] - estimate.get("eval_seconds", 0.0)
                      if estimate.get("device") == run.device.value and estimate.get("seconds") is not None else None)
    # Every decision that changes the eager step's speed: a faster eager step changes what compiling gains.
    decided = {name: run.decisions.get(name, {}).get("value") for name in (
        "attention", "attention_softmax", "sequence_kernel", "attention_segments", "lora_dropout", "layer_kernel")}
    step = (f"{run.cfg.method.stage} {run.method.value} dropout {run.cfg.method.dropout}, {run.precision.value}, "
            f"attention {decided['attention']} softmax {decided['attention_softmax']} segments from "
            f"{decided['attention_segments']} through {decided['sequence_kernel']} dropout mask "
            f"{decided['lora_dropout']} layers {decided['layer_kernel']}, "
            f"batch {args.per_device_train_batch_size} x {args.max_seq_length}")
    key = compile_probe.step_key(model.config, run.trainable_parameters, step)
    chosen = run.keep_or_decide("compile", lambda: performance.choose_compile(
        args.torch_compile, run.device.value, train_estimate, run.world.active, args.gradient_checkpointing,
        compile_probe.cached_gain(key)), args.torch_compile == "auto")
    decision = run.decide("compile", performance.use_compile(model, chosen))
    if decision.value == "measure":
        batch = objective.collate(sequences[:args.per_device_train_batch_size])
        measured = compile_probe.measure(model, objective, batch, key)
        decision = run.decide("compile", compile_probe.decide(measured, train_estimate, compiled_already=True))
        if decision.value == "off":
            performance.undo_compile(model)
    run.record(decisions=run.decisions)


def _measure(run: _Job, result) -> None:
    """Peak memory and time against the plan's estimate (the estimator checks itself after every run)."""
    import torch

    from trainer.devices import peak_rss_mb

    device, estimate = run.device.value, estimate_of(run.job)
    measured = {"peak_rss_mb": peak_rss_mb(),
                "train_seconds": round(result.elapsed, 2), "steps": result.steps, "tokens": result.tokens,
                "core_wait": result.core_wait}
    if device == "cuda":  # the GPU's own peak, what `estimate` predicts for cuda (RSS is only the host side)
        measured["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if estimate and device == estimate.get("device") == "cpu":
        # Signed: + means the estimate guessed high.
        measured["memory_error"] = round(estimate["peak_memory_mb"] / measured["peak_rss_mb"] - 1, 3)
        measured["time_error"] = round(estimate["seconds"] / max(measured["train_seconds"], 1e-3) - 1, 3)
        print(f"estimate vs measured: memory {estimate['peak_memory_mb']:.0f} vs {measured['peak_rss_mb']:.0f} MB "
              f"({100 * measured['memory_error']:+.0f}%), time {estimate['seconds']:.1f} vs "
              f"{measured['train_seconds']:.1f} s ({100 * measured['time_error']:+.0f}%)", flush=True)
    run.record(final_loss=result.final_loss, tokens_per_second=round(result.tokens_per_second, 2),
               train_seconds=round(result.elapsed, 2), measured=measured)


def run(folder: Path) -> int:
    """Run the job in `folder`; the exit code is 0 only when it completed."""
    return run_job(folder, _train, "stop requested: saving a checkpoint, then stopping")
