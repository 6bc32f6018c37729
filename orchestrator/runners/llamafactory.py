"""The runner of `fine_tuner.type: llamafactory` jobs: a detached supervisor process on this machine
(trainer/llamafactory/supervise.py) that runs LlamaFactory's trainer in its own managed venv.
Started and stopped like the local runner (a new process group; stop is SIGTERM to the group)."""

from __future__ import annotations

import sys
from pathlib import Path

from contract.job_folder import LOG_FILE
from orchestrator.runners.base import LaunchSpec
from orchestrator.runners.local import PROJECT_ROOT, LocalRunner, trainer_env, watched


class LlamaFactoryRunner(LocalRunner):
    name = "llamafactory"

    def preflight(self, cfg, plan) -> str:
        from contract import llamafactory as env

        if env.is_ready():
            return f"LlamaFactory {env.LLAMAFACTORY_VERSION} environment ready in {env.env_dir()}"
        return (f"LlamaFactory {env.LLAMAFACTORY_VERSION} environment not built yet: the job creates it first in "
                f"{env.env_dir()} (about 2 minutes; `python -m trainer.llamafactory.env` builds it ahead)")

    def launch_spec(self, job_dir: Path) -> LaunchSpec:
        return LaunchSpec(
            argv=watched(job_dir, [sys.executable, "-m", "trainer.llamafactory.supervise", str(job_dir)]),
            cwd=PROJECT_ROOT,
            env=trainer_env(),
            log_path=job_dir / LOG_FILE,
        )
