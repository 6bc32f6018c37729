"""Making a job's plan on the host: every decision `start` can make before a job exists, once.

The plan's shape and its reader are in contract/plan.py; the runners and the trainer only read it.
"""

from __future__ import annotations

from dataclasses import replace

from contract.decisions import Decision, choose_device, choose_distributed, choose_method
from contract.plan import JobPlan
from contract.strategy import Strategy


def device_here(cfg) -> Decision:
    """The training device for a strategy on this machine, from what the OS shows (no torch)."""
    from contract.platform import available_devices

    return choose_device(cfg.device, cfg.fallback_device, available_devices())


def make_plan(strategy: Strategy, runner_flag: str | None = None) -> JobPlan:
    """Device, method, runner, image and distributed layout; `with_estimate` adds the estimate.
    Raises UserError for what cannot run here (QLoRA off CUDA without fallback, an absent device)."""
    from orchestrator.backends import BACKENDS
    from orchestrator.runners import choose_runner

    cfg = strategy.cfg
    device = device_here(cfg)
    method = choose_method(cfg.method, device.value)  # QLoRA off CUDA: refused or LoRA, before any job exists
    backend = BACKENDS[strategy.fine_tuner.type]
    if backend.runner:  # a backend with an environment of its own starts its own way
        runner = Decision(backend.runner, f"fine_tuner.type {strategy.fine_tuner.type}")
    else:
        chosen, reason = choose_runner(runner_flag, cfg.runner, cfg, device.value)
        runner = Decision(chosen.name, reason)
    return JobPlan(device=device, method=method, runner=runner, image=_image(cfg, runner.value, device.value),
                   distributed=choose_distributed(cfg.distributed, device.value))


def _image(cfg, runner: str, device: str) -> Decision | None:
    if runner != "container":
        return None
    from orchestrator.runners.container import image_for

    tag, kind = image_for(cfg, device)
    return Decision(tag, "container.image in the strategy" if cfg.container.image
                    else f"the {kind} image for device {device}")


def with_estimate(plan: JobPlan, est) -> JobPlan:
    figures = {"peak_memory_mb": est.peak_memory_mb, "seconds": est.seconds, "steps": est.steps,
               "eval_seconds": est.eval_seconds, "device": est.device}
    return replace(plan, estimate=Decision(figures, f"`llamafarm finetune estimate` for {est.device}"))
