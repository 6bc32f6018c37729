"""`llamafarm finetune estimate`: memory, time, disk and a verdict before a run."""

from __future__ import annotations

from pathlib import Path

import click

from contract.errors import UserError
from orchestrator.cli.base import STRATEGY_FILES, emit_json, finetune, load_strategy


@finetune.command("estimate")
@click.option("--strategy", "strategy_name", required=True, help="Strategy name (see `strategies list`).")
@click.option("--dataset", type=click.Path(), default=None, help="Count tokens from this dataset (else an assumption, stated).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto",
              help="Device to judge against (default: what the strategy would get here).")
@click.option("--set", "assignments", multiple=True, metavar="PATH=VALUE", help="Override a strategy value.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@STRATEGY_FILES
def estimate_cmd(strategy_name, dataset, device, assignments, as_json, strategy_files):
    """Predict peak memory, time and disk for a strategy, and whether it fits this machine.

    \b
    Example:
      llamafarm finetune estimate --strategy tiny_demo --dataset demos/datasets/medical_qa.jsonl
    """
    from orchestrator.estimate import estimate

    _, strategy, _ = load_strategy(strategy_name, assignments, strategy_files)
    est = estimate(strategy, Path(dataset) if dataset else None, _estimate_device(strategy, device))
    if as_json:
        emit_json(est.to_dict())
        return
    _print_estimate(strategy_name, est, strategy.cfg.time_warning_hours)


def _estimate_device(strategy, flag: str) -> str:
    from orchestrator.plan import device_here

    if flag != "auto":
        return flag
    cfg = strategy.cfg
    try:
        return device_here(cfg).value
    except UserError:
        return cfg.device  # judged against the device it asks for, even if absent here


def time_warning(est, hours: float) -> str | None:
    """A fitting run can still be too long to want: say so past the strategy's time_warning_hours."""
    from orchestrator.monitor import format_duration

    if est.seconds is None or est.seconds <= hours * 3600:
        return None
    return (f"warning: about {format_duration(est.seconds)} of training, longer than time_warning_hours ({hours:g} h); "
            "lower training_args.num_train_epochs or max_steps, or raise time_warning_hours "
            f"(--set time_warning_hours={max(hours, est.seconds / 3600) * 2:.0f})")


def _print_estimate(name: str, est, warn_hours: float | None = None) -> None:
    from orchestrator.monitor import format_duration

    click.echo(f"{name}: {est.model} ({est.params / 1e6:,.1f}M parameters, {est.trainable_params / 1e6:,.2f}M trained; "
               f"shape from {est.shape_source})")
    parts = ", ".join(f"{k} {v:,.0f}" for k, v in est.memory_mb.items())
    avail = f" of {est.available_memory_mb:,.0f} MB available" if est.available_memory_mb else ""
    click.echo(f"memory on {est.device}: peak about {est.peak_memory_mb:,.0f} MB{avail} ({parts} MB)")
    click.echo(f"  activations with gradient checkpointing {est.activations_mb_with_checkpointing:,.0f} MB, "
               f"without {est.activations_mb_without_checkpointing:,.0f} MB")
    click.echo(f"time: about {format_duration(est.seconds)} for {est.steps} steps, {est.train_tokens:,} tokens "
               f"({est.tokens_per_epoch:,} per epoch, {est.tokens_source}); "
               f"{est.flops_per_token / 1e6:,.1f} MFLOP/token at {est.device_gflops:,.0f} GFLOP/s peak")
    click.echo("disk: " + ", ".join(f"{k} {v:,.0f} MB" for k, v in est.disk_mb.items()))
    if est.fits is None:
        click.echo(f"verdict: unknown, no {est.device} device on this machine to compare with")
    elif est.fits:
        click.echo("verdict: fits")
    else:
        click.echo("verdict: does NOT fit; to make it fit:")
        for tip in est.advice:
            click.echo(f"  - {tip}")
    if est.busy:
        click.echo(f"note: {est.busy}")
    warning = time_warning(est, warn_hours) if warn_hours else None
    if warning:
        click.echo(warning)
