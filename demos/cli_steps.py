"""What both demos share: each step is one `llamafarm` command, run with an argument list (never a
string split by a shell), printed before it runs; a failed step ends the demo with its exit code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

DEMOS = Path(__file__).resolve().parent
DATASETS = DEMOS / "datasets"


class StepFailed(SystemExit):
    pass


def llamafarm() -> list[str]:
    """The llamafarm command: next to this Python (the project's venv), else on PATH."""
    beside = Path(sys.executable).parent / "llamafarm"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("llamafarm")
    if not found:
        raise StepFailed("llamafarm is not installed: run `bash scripts/install.sh`, then use .venv/bin/python")
    return [found]


def banner(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run(*args: str, capture: bool = False, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `llamafarm ARGS`; stream its output (or capture it for --json parsing). A failure stops the demo."""
    argv = [*llamafarm(), *args]
    print("$ llamafarm " + " ".join(_quote(a) for a in args), flush=True)
    proc = subprocess.run(argv, env={**os.environ, **(env or {})}, text=True,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None)
    if capture and proc.stderr:
        sys.stderr.write(proc.stderr)
    if check and proc.returncode:
        raise StepFailed(f"step failed (exit {proc.returncode}): llamafarm {' '.join(args)}")
    return proc


def run_json(*args: str, env: dict | None = None):
    """Run a `--json` command and return what it printed, parsed."""
    out = run(*args, "--json", capture=True, env=env).stdout
    return json.loads(out[out.index(next(c for c in out if c in "[{")):])


def _quote(arg: str) -> str:
    return repr(arg) if (not arg or any(c in arg for c in " \"'$")) else arg


def main(body) -> None:
    """Run a demo body; exit 1 with the failed step's message, 0 when every step passed."""
    try:
        body()
    except StepFailed as exc:
        print(f"\ndemo stopped: {exc.code}", file=sys.stderr)
        sys.exit(1)
    print("\ndemo finished: every step passed", flush=True)
