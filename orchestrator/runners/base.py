"""The runner interface: where and how the shared training entrypoint starts.

A runner is pure until it executes: `preflight` refuses what cannot start before a job exists,
`launch_spec` builds the exact command (testable anywhere), `start` executes it detached and returns
a pid, `stop` asks the job to checkpoint and end.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

# What a killed trainer's exit says, by signal; a SIGKILL nobody sent by hand is the kernel's
# out-of-memory killer, the one end a process cannot catch and so cannot report itself.
_SIGNAL_MEANINGS = {
    signal.SIGKILL: "killed (SIGKILL), most often by the system for running out of memory: lower "
                    "per_device_train_batch_size or max_seq_length, or turn on gradient_checkpointing",
    signal.SIGSEGV: "crashed (segmentation fault)",
}


def describe_exit(code: int) -> str:
    """What a trainer's exit code means when it ended without writing its status. Python's subprocess
    reports a signal as minus its number, container engines and shells as 128 plus it."""
    number = -code if code < 0 else code - 128 if code > 128 else None
    try:
        sig = signal.Signals(number) if number else None
    except ValueError:
        sig = None
    if sig is None:
        return "ended without reporting a status"
    return _SIGNAL_MEANINGS.get(sig, f"ended by signal {sig.name}")


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
