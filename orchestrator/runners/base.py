"""The runner interface: where and how the shared training entrypoint starts.

A runner is pure until it executes: `preflight` refuses what cannot start before a job exists,
`launch_spec` builds the exact command (testable anywhere), `start` executes it detached and returns
a pid, `stop` asks the job to checkpoint and end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class LaunchSpec:
    argv: list[str]
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)
    """The whole environment of the started process."""
    log_path: Path | None = None


class Runner(Protocol):
    name: str

    def preflight(self, cfg, plan) -> str | None:
        """Refuse with a UserError, before any job exists, what this runner cannot start under `plan`
        (contract/plan.py); else return a line worth printing (what it will use) or None."""
        ...

    def launch_spec(self, job_dir: Path) -> LaunchSpec: ...

    def start(self, spec: LaunchSpec) -> int: ...

    def stop(self, job: dict) -> None: ...
