"""The runner registry and the choice of runner for a job."""

from __future__ import annotations

from contract.errors import UserError
from orchestrator.runners.base import LaunchSpec, Runner
from orchestrator.runners.llamafactory import LlamaFactoryRunner
from orchestrator.runners.local import LocalRunner

RUNNERS: dict[str, Runner] = {r.name: r for r in (LocalRunner(), LlamaFactoryRunner())}

__all__ = ["RUNNERS", "LaunchSpec", "Runner", "get_runner", "choose_runner"]


def get_runner(name: str) -> Runner:
    try:
        return RUNNERS[name]
    except KeyError:
        raise UserError(f"unknown runner {name!r}; valid: {', '.join(RUNNERS)}") from None


def choose_runner(flag: str | None, strategy_runner: str) -> tuple[Runner, str]:
    """The runner and the reason: --runner beats the strategy; auto is the local process for now."""
    if flag and flag != "auto":
        return get_runner(flag), "--runner flag"
    if strategy_runner != "auto":
        return get_runner(strategy_runner), "set in the strategy"
    return RUNNERS["local"], "auto; the local process is the only runner in this version"
