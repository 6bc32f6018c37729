"""Progress of a job, read from its folder alone (whichever runner ran it)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from contract.job_folder import FINISHED, elapsed_since, read_metrics
from orchestrator import jobs
from orchestrator.plot import sparkline


def summary(job: dict, metrics: list[dict]) -> dict:
    """What a person or a script wants to know about a job, in one dict."""
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_loss" in m]
    last = train[-1] if train else {}
    total = job.get("total_steps") or last.get("total_steps")
    step = last.get("step", 0)
    eta = None
    if total and step and job.get("status") == "running":
        eta = last["elapsed"] / step * (total - step)
    return {
        "job_id": job["job_id"],
        "status": job["status"],
        "strategy": job.get("strategy"),
        "step": step,
        "total_steps": total,
        "epoch": last.get("epoch"),
        "loss": last.get("loss"),
        "first_loss": train[0]["loss"] if train else None,
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        # Preference stages (dpo, orpo, kto): held-out preference accuracy and margin, else None.
        "eval_reward_accuracy": evals[-1].get("eval_reward_accuracy") if evals else None,
        "eval_reward_margin": evals[-1].get("eval_reward_margin") if evals else None,
        "reward_accuracy": last.get("reward_accuracy"),
        "note": job.get("note") if job.get("status") == "running" else None,
        "loss_sparkline": sparkline([m["loss"] for m in train]),
        "learning_rate": last.get("learning_rate"),
        "tokens_per_second": last.get("tokens_per_second"),
        "elapsed": last.get("elapsed") or elapsed_since(job.get("started_at")),
        "eta_seconds": None if eta is None else round(eta, 1),
        "error": job.get("error"),
    }


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def bar(step: int, total: int | None, width: int = 30) -> str:
    if not total:
        return "[" + " " * width + "]"
    filled = round(width * min(step / total, 1.0))
    return "[" + "#" * filled + "." * (width - filled) + f"] {step}/{total} ({100 * step / total:.0f}%)"


def render(s: dict) -> str:
    parts = [f"{s['job_id']}  {s['status']:<9} {bar(s['step'], s['total_steps'])}"]
    if s["loss"] is not None:
        parts.append(f"loss {s['loss']:.4f} (first {s['first_loss']:.4f}) {s['loss_sparkline']}")
    if s["eval_loss"] is not None:
        parts.append(f"eval {s['eval_loss']:.4f}")
    if s.get("reward_accuracy") is not None:
        parts.append(f"pairs ranked right {s['reward_accuracy']:.2f}")
    if s.get("eval_reward_accuracy") is not None:
        # KTO scores single answers, not pairs, so its evaluation has an accuracy but no margin.
        margin = s.get("eval_reward_margin")
        parts.append(f"(eval {s['eval_reward_accuracy']:.2f}" + (f", margin {margin:.2f})" if margin is not None else ")"))
    if s["tokens_per_second"]:
        parts.append(f"{s['tokens_per_second']:.0f} tok/s")
    parts.append(f"elapsed {format_duration(s['elapsed'])}")
    if s["eta_seconds"] is not None:
        parts.append(f"eta {format_duration(s['eta_seconds'])}")
    line = "  ".join(parts)
    if s.get("note"):
        line += f"\n  note: {s['note']}"
    if s["error"]:
        line += f"\n  error: {s['error']}"
    return line


def follow(folder: Path, interval: float = 1.0, echo=click.echo) -> dict:
    """Print a line per new metrics record until the job finishes; return the final summary."""
    seen = 0
    while True:
        job = jobs.refresh(folder)
        metrics = read_metrics(folder)
        if len(metrics) > seen or job["status"] in FINISHED:
            s = summary(job, metrics)
            if len(metrics) > seen:
                echo(render(s))
                seen = len(metrics)
            if job["status"] in FINISHED:
                echo(f"job {job['job_id']} {job['status']}" + (f": {job['error']}" if job.get("error") else ""))
                return s
        time.sleep(interval)
