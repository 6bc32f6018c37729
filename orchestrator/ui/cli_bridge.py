"""Actions from the page run the `llamafarm` command itself, in a subprocess.

The CLI commands own the checks, decisions and messages (preflight, estimate, resume rules); calling
them, not a copy, keeps the page and the terminal identical. They run in the folder `llamafarm ui`
was started in, so a relative dataset path means what it means on the command line. A subprocess also keeps click's output
and a failing trainer away from the server. Cost: about 0.3 s of interpreter start per action."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

from contract.errors import UserError
from orchestrator.runners.local import trainer_env


def cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", *args]


def _error_line(stderr: str, code: int) -> str:
    """The CLI's `Error: ...` message (with the lines it lists under it) for the page."""
    lines = [line for line in stderr.rstrip().splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("Error: "):
            return "\n".join([lines[i][len("Error: "):], *lines[i + 1:]])
    return lines[-1] if lines else f"the command exited with status {code}"


def run(*args: str, timeout: float | None = None) -> str:
    """Run `llamafarm ARGS`; its stdout, or a UserError carrying the CLI's own error message."""
    proc = subprocess.run(cli_argv(*args), env=trainer_env(), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode:
        raise UserError(_error_line(proc.stderr, proc.returncode))
    return proc.stdout


def run_json(*args: str, timeout: float | None = None):
    """Run a `--json` command and parse what it printed (its last line for streamed output)."""
    cut = args.index("--") if "--" in args else len(args)  # options go before a `--` separator
    out = run(*args[:cut], "--json", *args[cut:], timeout=timeout)
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        return json.loads(out.strip().splitlines()[-1])


def stream(*args: str) -> Iterator[str]:
    """Run `llamafarm ARGS` and yield its stdout as it arrives; a failure ends with UserError."""
    import codecs

    proc = subprocess.Popen(cli_argv(*args), env=trainer_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        while chunk := proc.stdout.read1(256):
            if text := decoder.decode(chunk):
                yield text
        code = proc.wait()
        if code:
            raise UserError(_error_line(proc.stderr.read().decode(errors="replace"), code))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
