"""The native runner: the shared entrypoint in a venv that llamafarm manages, on this machine.

It exists for Apple MPS (Metal cannot be used from a container), and works on any host with
`--runner native`. The venv is built from the lock images/native-mps/requirements.txt with --no-deps, so it
holds exactly the pinned versions and nothing of the caller's environment; it is cached under
<LLAMAFARM_CACHE>/native-venv/<python>-<lock digest> and rebuilt only when the lock changes.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
from pathlib import Path

from contract.errors import UserError
from contract.job_folder import LOG_FILE
from orchestrator.runners.base import LaunchSpec
from orchestrator.runners.local import PROJECT_ROOT, LocalRunner, trainer_env, watched

LOCK = PROJECT_ROOT / "images" / "native-mps" / "requirements.txt"
_COMPLETE = ".llamafarm-complete"  # written last: a venv without it is half-built


def venvs_root() -> Path:
    from contract.paths import cache_root

    return cache_root() / "native-venv"


def venv_dir() -> Path:
    from orchestrator.images import lock_digest

    return venvs_root() / f"py{sys.version_info.major}{sys.version_info.minor}-{lock_digest(LOCK)}"


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def _run(argv: list, what: str) -> None:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    if proc.returncode:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise UserError(f"native runner: {what} failed (exit {proc.returncode}):\n{tail}")


def ensure_venv(echo=print) -> Path:
    """The venv for the current lock, built first if needed; safe when two starts race."""
    venv = venv_dir()
    if (venv / _COMPLETE).is_file():
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.with_name(venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second start waits here, then finds the venv complete
        if (venv / _COMPLETE).is_file():
            return venv
        shutil.rmtree(venv, ignore_errors=True)  # a half-built one from an interrupted start
        echo(f"native runner: building the venv {venv} from {LOCK.relative_to(PROJECT_ROOT)} (first use of this lock)")
        _run([sys.executable, "-m", "venv", venv], "creating the venv")
        python = venv_python(venv)
        _run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "-r", LOCK],
             f"installing {LOCK.name}")
        _run([python, "-m", "pip", "check"], "checking the installed lock is complete (pip check)")
        (venv / _COMPLETE).write_text(str(LOCK) + "\n")
    _remove_others(venv)
    return venv


def _remove_others(keep: Path) -> None:
    """Venvs of earlier locks are never used again; one another start is building right now stays."""
    for lock_path in venvs_root().glob("*.lock"):
        other = lock_path.with_suffix("")
        if other == keep:
            continue
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            shutil.rmtree(other, ignore_errors=True)
            lock_path.unlink(missing_ok=True)


class NativeRunner:
    name = "native"

    def preflight(self, cfg, plan) -> str:
        venv = ensure_venv(echo=lambda msg: print(msg, file=sys.stderr, flush=True))  # stdout may be --json
        return f"venv {venv} (from {LOCK.relative_to(PROJECT_ROOT)})"

    def launch_spec(self, job_dir: Path) -> LaunchSpec:
        env = trainer_env()
        env.pop("VIRTUAL_ENV", None)
        # Only the project on the path, never the caller's site-packages; ops that MPS lacks run on the CPU.
        env.update({"PYTHONNOUSERSITE": "1", "PYTORCH_ENABLE_MPS_FALLBACK": "1"})
        return LaunchSpec(
            argv=watched(job_dir, [str(venv_python(venv_dir())), "-m", "trainer", "train", str(job_dir)]),
            cwd=PROJECT_ROOT,
            env=env,
            log_path=Path(job_dir) / LOG_FILE,
        )

    def start(self, spec: LaunchSpec) -> int:
        return LocalRunner().start(spec)

    def stop(self, job: dict) -> None:
        LocalRunner().stop(job)
