"""The runner registry and the choice of runner for a job."""

from __future__ import annotations

import os

from contract.errors import UserError
from orchestrator.runners.base import LaunchSpec, Runner
from orchestrator.runners.container import ContainerRunner
from orchestrator.runners.llamafactory import LlamaFactoryRunner
from orchestrator.runners.local import LocalRunner
from orchestrator.runners.native import NativeRunner

RUNNERS: dict[str, Runner] = {r.name: r for r in (LocalRunner(), ContainerRunner(), NativeRunner(), LlamaFactoryRunner())}
# Used where neither --runner nor the strategy names a runner, instead of the auto rules below
# (the test suite sets it to local, so tests that start jobs never depend on a container engine).
RUNNER_ENV = "LLAMAFARM_RUNNER"

__all__ = ["RUNNERS", "RUNNER_ENV", "LaunchSpec", "Runner", "get_runner", "choose_runner"]


def get_runner(name: str) -> Runner:
    try:
        return RUNNERS[name]
    except KeyError:
        raise UserError(f"unknown runner {name!r}; valid: {', '.join(RUNNERS)}") from None


def choose_runner(flag: str | None, strategy_runner: str, cfg=None, device: str = "cpu") -> tuple[Runner, str]:
    """The runner and the reason: --runner, then the strategy, then $LLAMAFARM_RUNNER, then auto:
    mps -> native (Metal cannot be used from a container); cuda or cpu -> the container runner when an
    engine answers and holds the image, else the local process."""
    if flag and flag != "auto":
        return get_runner(flag), "--runner flag"
    if strategy_runner != "auto":
        return get_runner(strategy_runner), "set in the strategy"
    if os.environ.get(RUNNER_ENV, "auto") != "auto":
        return get_runner(os.environ[RUNNER_ENV]), f"{RUNNER_ENV}={os.environ[RUNNER_ENV]}"
    if device == "mps":
        return RUNNERS["native"], "auto; device mps: Metal cannot be used from a container, so a managed venv"
    if cfg is None:
        return RUNNERS["local"], "auto; no strategy to match an image to"
    ok, why = RUNNERS["container"].available(cfg, device)
    if ok:
        return RUNNERS["container"], f"auto; device {device}: {why}"
    return RUNNERS["local"], f"auto; {why}, so the local process"
