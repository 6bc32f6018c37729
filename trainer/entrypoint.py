"""The shared training entrypoint: every runner ends here with a job folder.

    python -m trainer train <job_dir>

It reads only the job folder (strategy.yaml and the inputs in job.json), prints each decision with
its reason, trains, and writes status, metrics, checkpoints and final weights back into the folder.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import traceback
from pathlib import Path

import yaml

from contract.errors import UserError
from contract.job_folder import (
    METRICS_FILE,
    STRATEGY_FILE,
    complete_checkpoints,
    now_iso,
    read_job,
    read_metrics,
    update_job,
)
from contract.strategy import Strategy, parse_strategy


def load_job_strategy(folder: Path) -> tuple[Strategy, str]:
    text = (folder / STRATEGY_FILE).read_text()
    return parse_strategy(str(folder / STRATEGY_FILE), yaml.safe_load(text)), text


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _say(what: str, decision) -> dict:
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
    metrics = folder / METRICS_FILE
    if metrics.exists() and (world is None or world.writes):
        kept = [r for r in read_metrics(folder) if r.get("step", 0) <= state.step]
        tmp = metrics.with_name(f".{metrics.name}.tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        tmp.replace(metrics)
    print(f"resume: from {path.name}", flush=True)
    return path, state, extra


def choose_packing(setting, model, stage: str = "sft"):
    """Packing needs attention that honours a 4-D mask; FlashAttention-style kernels do not."""
    from trainer.devices import Decision

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
    return Decision("on", "set in the strategy" if setting is True else f"auto; block-diagonal masks with {impl} attention")


def _reference_model(model, stage: str, method: str, device: str, decisions: dict):
    """DPO and KTO compare with the base: with LoRA the adapter is switched off (no copy); full
    fine-tuning keeps a frozen copy, which `estimate` counts. ORPO and SFT need none."""
    from trainer.devices import Decision

    if stage not in ("dpo", "kto"):
        return None
    if method != "full":
        decisions["reference"] = _say("reference model", Decision("base with the adapter off", f"{method}: no copy"))
        return None
    import copy

    ref = copy.deepcopy(model).to(device).eval()
    ref.requires_grad_(False)
    decisions["reference"] = _say("reference model", Decision("frozen copy", "full fine-tuning changes every weight"))
    return ref


def _check_architecture(model_path: str, spec) -> None:
    """Refuse, before any weights load, a model family that export could not write and verify."""
    from transformers import AutoConfig

    from trainer.export.architectures import architecture_of

    config = AutoConfig.from_pretrained(model_path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    name, arch = architecture_of(config.to_dict())
    print(f"architecture: {name} (family {arch.family}; GGUF architecture {arch.name})", flush=True)


def _train(folder: Path, stop_flag: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer import distributed, loop, performance, saving
    from trainer.data.prepare import prepare
    from trainer.data.tokenize import choose_template
    from trainer.devices import choose_device, choose_precision
    from trainer.methods import METHODS, choose_method
    from trainer.reporting import MetricsSink
    from trainer.models import source

    strategy, strategy_text = load_job_strategy(folder)
    cfg = strategy.cfg
    job = read_job(folder)
    args = cfg.training_args

    device = choose_device(cfg.device, cfg.fallback_device)
    precision = choose_precision(args.precision, device.value)
    method = choose_method(cfg.method, device.value)
    decisions = {"device": _say("device", device), "precision": _say("precision", precision)}
    decisions["method"] = _say("method", method)
    world, how = distributed.join(cfg.distributed, device.value)
    if how:
        decisions["distributed"] = _say("distributed", how)
    record = update_job if world.writes else (lambda *a, **k: None)  # one writer per job folder

    _seed_everything(args.seed)
    print(f"base model: {cfg.base_model.name} = {cfg.base_model.huggingface_id} "
          f"({source.check_available(cfg.base_model)})", flush=True)
    with world.local_first():
        model_path = source.resolve(cfg.base_model)
    _check_architecture(model_path, cfg.base_model)
    if cfg.base_model.trust_remote_code:
        print("trust_remote_code: on (set in the strategy): the model repo's own code will run", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(
        model_path, revision=cfg.base_model.revision, trust_remote_code=cfg.base_model.trust_remote_code
    )
    template, template_reason = choose_template(cfg.dataset.template, tokenizer)
    print(template_reason, flush=True)
    decisions["template"] = {"value": template.name, "reason": template_reason}

    eval_file = Path(job["eval_dataset"]) if job.get("eval_dataset") else None
    preference = cfg.method.stage != "sft"
    with world.local_first():
        if preference:
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

    base_dtype = performance.choose_base_dtype(method.value, precision.value)
    decisions["base_weights"] = _say("base weights", base_dtype)
    load_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[base_dtype.value]
    builder = METHODS[method.value]
    resume = _resume_point(folder, job, world)
    resume_path = resume[0] if resume else None
    model = AutoModelForCausalLM.from_pretrained(
        resume_path if (resume and method.value == "full") else model_path,
        revision=cfg.base_model.revision,
        trust_remote_code=cfg.base_model.trust_remote_code,
        dtype=load_dtype,
        use_safetensors=True,
        **builder.load_kwargs(cfg.method, load_dtype),
    )
    ref_model = _reference_model(model, cfg.method.stage, method.value, device.value, decisions)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    method_spec = cfg.method
    if method.value != "full":
        from trainer.devices import Decision
        from trainer.methods import resolve_targets

        targets = resolve_targets(model, cfg.method)  # checked where the model is known; the schema only has names
        decisions["target_modules"] = _say("target modules", Decision(", ".join(targets.value), targets.reason))
        method_spec = cfg.method.model_copy(update={"target_modules": targets.value})
    model = builder.make_trainable(model, method_spec, resume_path if method.value != "full" else None)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if method.value != "qlora":
        model.to(device.value)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)", flush=True)
    # The tokenizer saved with every artifact carries the template the data was shaped with.
    tokenizer.chat_template = template.jinja
    packing = choose_packing(cfg.dataset.packing, model, cfg.method.stage)
    decisions["packing"] = _say("packing", packing)
    attention = performance.choose_attention(device.value, packing.value == "on", model.config,
                                             args.per_device_train_batch_size, args.max_seq_length, precision.value)
    decisions["attention"] = _say("attention", attention)
    performance.use_attention(model, attention)
    adapter_inputs = performance.choose_adapter_inputs(method.value, precision.value)
    decisions["adapter_inputs"] = _say("adapter inputs", adapter_inputs)
    chunked_loss = performance.choose_chunked_loss(model)
    if world.active and chunked_loss.value == "on":
        chunked_loss = distributed.NO_CHUNKED_LOSS
    decisions["chunked_loss"] = _say("chunked loss", chunked_loss)
    estimate = job.get("estimate") or {}
    # Training time only: evaluation runs eager, so compiling does not shorten it.
    train_estimate = (estimate["seconds"] - estimate.get("eval_seconds", 0.0)
                      if estimate.get("device") == device.value and estimate.get("seconds") is not None else None)
    compiled = performance.use_compile(model, performance.choose_compile(
        args.torch_compile, device.value, train_estimate, world.active, args.gradient_checkpointing))
    decisions["compile"] = _say("compile", compiled)
    decisions["threads"] = _say("threads", performance.choose_threads())
    if preference:  # items (pairs or KTO rows), batched as they are
        sequences, padding = data.train, None
    else:
        sequences = loop.make_sequences(data.train, args.max_seq_length, packing.value == "on", args.seed)
        padding = loop.padding_fraction(sequences, args.per_device_train_batch_size, args.seed, packing.value == "on")
        print(f"padding: {100 * padding:.1f}% of positions ({len(data.train)} rows in {len(sequences)} sequences)",
              flush=True)
    record(
        folder,
        decisions=decisions,
        data={"rows": stats.rows, "train": len(data.train), "eval": len(data.eval), "truncated": stats.truncated,
              "dropped": stats.dropped_too_long + stats.dropped_no_target, "tokens": stats.tokens,
              "sequences": len(sequences), "padding_fraction": None if padding is None else round(padding, 4), "cache_hit": data.cache_hit},
        trainable_parameters=trainable,
    )

    def checkpoint(state, optimizer, scheduler, scaler) -> None:
        if world.mode == "fsdp":  # the schema refuses save_steps with fsdp; this is a stop
            print("checkpoint: none (not supported with distributed.mode fsdp); the job cannot be resumed", flush=True)
            return
        rng_by_rank = world.gather(saving.rng_state()) if world.active else None
        if world.writes:  # DDP: every process holds the same weights and optimizer state
            path = saving.save_checkpoint(model, tokenizer, strategy_text, folder, state, optimizer, scheduler, scaler,
                                          args.save_total_limit, rng_by_rank)
            print(f"checkpoint: {path}", flush=True)

    def best(step: int) -> None:
        weights = world.full_state_dict(model)  # FSDP gathers on every process
        if world.writes:
            saving.save_best(model, tokenizer, strategy_text, folder, weights)
            print(f"best so far at step {step}: saved to {folder / 'best'}", flush=True)

    trained = world.wrap(model, device.value)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    objective = None
    if preference:
        from trainer.preference import PreferenceObjective

        objective = PreferenceObjective(cfg.method.stage, cfg.method, pad_id, device.value,
                                        lambda: loop._autocast(device.value, precision.value), ref_model)
    if world.active:
        torch.manual_seed(args.seed + world.rank)  # dropout masks differ between processes
    sink = MetricsSink(folder, args.report_to) if world.writes else distributed.NullSink()
    try:
        with performance.adapter_inputs(model, adapter_inputs):
            result = loop.train(
                trained, sequences, data.eval, args, device=device.value, precision=precision.value,
                packed=packing.value == "on",
                pad_id=pad_id, objective=objective,
                job_dir=folder, hooks=loop.Hooks(checkpoint, best, lambda: stop_flag["stop"]), sink=sink,
                resume=resume[1:] if resume else None, chunked_loss=chunked_loss.value == "on", world=world,
            )
    finally:
        sink.close()
    weights = world.full_state_dict(model)
    if world.writes:
        final = saving.save_final(model, tokenizer, strategy_text, folder, weights)
        print(f"final weights: {final}", flush=True)
    from trainer.devices import peak_rss_mb

    measured = {"peak_rss_mb": peak_rss_mb(),
                "train_seconds": round(result.elapsed, 2), "steps": result.steps, "tokens": result.tokens}
    if device.value == "cuda":  # the GPU's own peak, what `estimate` predicts for cuda (RSS is only the host side)
        measured["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if estimate and device.value == estimate.get("device") == "cpu":
        # The estimator checks itself after every run: its error, signed (+ means it guessed high).
        measured["memory_error"] = round(estimate["peak_memory_mb"] / measured["peak_rss_mb"] - 1, 3)
        measured["time_error"] = round(estimate["seconds"] / max(measured["train_seconds"], 1e-3) - 1, 3)
        print(f"estimate vs measured: memory {estimate['peak_memory_mb']:.0f} vs {measured['peak_rss_mb']:.0f} MB "
              f"({100 * measured['memory_error']:+.0f}%), time {estimate['seconds']:.1f} vs "
              f"{measured['train_seconds']:.1f} s ({100 * measured['time_error']:+.0f}%)", flush=True)
    record(folder, final_loss=result.final_loss, tokens_per_second=round(result.tokens_per_second, 2),
           train_seconds=round(result.elapsed, 2), measured=measured)
    world.close()


def run(folder: Path) -> int:
    """Run the job in `folder`; the exit code is 0 only when it completed."""
    from trainer.distributed import Role, quiet_unless_writer
    from trainer.loop import StopRequested

    folder = Path(folder).resolve()
    role = Role.from_env()  # one process of a distributed job, or the only one
    quiet_unless_writer(role)
    stop_flag = {"stop": False}

    def _on_term(signum, frame):
        stop_flag["stop"] = True
        print("stop requested: saving a checkpoint, then stopping", flush=True)

    signal.signal(signal.SIGTERM, _on_term)
    # In a container our pid means nothing to the host: the container runner's supervisor holds it.
    # Under the distributed launcher the job's pid is the launcher's, which the runner recorded.
    own_pid = {} if (os.environ.get("LLAMAFARM_SUPERVISED") or role.launched) else {"pid": os.getpid()}
    if role.writes:
        update_job(folder, status="running", started_at=now_iso(), **own_pid)
    try:
        _train(folder, stop_flag)
    except StopRequested:
        if role.writes:
            update_job(folder, status="stopped", finished_at=now_iso())
        print("status: stopped", flush=True)
        return 3
    except UserError as exc:
        _record_failure(folder, role, str(exc), exc)
        print(f"error: {exc}", flush=True)
        return 1
    except BaseException as exc:  # a crash: keep the traceback in train.log, the message in job.json
        traceback.print_exc()
        _record_failure(folder, role, f"{type(exc).__name__}: {exc}", exc)
        return 1
    if role.writes:
        update_job(folder, status="completed", finished_at=now_iso())
    print("status: completed", flush=True)
    return 0


def _record_failure(folder: Path, role, error: str, exc: BaseException) -> None:
    """Any process's failure fails the job. In a distributed job the first failure recorded stays:
    the others usually follow from it (a collective whose peer is gone)."""
    if role.launched:
        error = f"rank {role.rank}: {error}"
        print(f"error: {error}", file=sys.stderr, flush=True)
        # The launcher's end-of-run summary names the first failed rank; this gives it the error too.
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exc)
        if read_job(folder).get("status") == "failed":
            return
    update_job(folder, status="failed", finished_at=now_iso(), error=error)
