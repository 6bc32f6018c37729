"""Distributed jobs: the one trainer entrypoint wrapped in PyTorch's own launcher.

    python -m torch.distributed.run <processes, machines, rendezvous> -m trainer train JOB_DIR

Every runner (local process, container) calls `launch_argv` on the trainer command it would run
anyway; for `distributed.mode: none` the command comes back unchanged. The launcher (the module
behind `torchrun`) starts nproc_per_node copies of the entrypoint on this machine, meets the other
machines at the rendezvous endpoint and ends every process when one fails. Pure: no torch import.
"""

from __future__ import annotations

from pathlib import Path

from contract.job_folder import STRATEGY_FILE, read_job_strategy
from contract.strategy import DistributedSpec

LAUNCHER_MODULE = "torch.distributed.run"


def job_distributed(job_dir: Path) -> DistributedSpec:
    """The `distributed` section of a job's resolved strategy (none where the folder holds no strategy:
    the trainer itself then reports what is missing)."""
    if not (Path(job_dir) / STRATEGY_FILE).exists():
        return DistributedSpec()
    return read_job_strategy(job_dir)[0].cfg.distributed


def launcher_options(dist: DistributedSpec) -> list[str]:
    """torchrun's options for this section: how many processes here, and where the machines meet."""
    options = [f"--nproc-per-node={dist.nproc_per_node}", "--max-restarts=0"]  # a failed rank ends the job
    if dist.nnodes == 1:
        # One machine: a rendezvous on a free local port, so two jobs never collide.
        return options + ["--standalone"]
    options += [f"--nnodes={dist.nnodes}", f"--rdzv-backend={dist.rdzv_backend}",
                f"--rdzv-endpoint={dist.rdzv_endpoint}", f"--rdzv-id={dist.rdzv_id}"]
    if dist.rdzv_backend == "static":
        options.append(f"--node-rank={dist.node_rank}")
    return options


def launch_argv(trainer_argv: list[str], dist: DistributedSpec) -> list[str]:
    """`[python, -m, trainer, train, JOB_DIR]` as it is, or wrapped in the launcher with the same python."""
    if dist.mode == "none":
        return list(trainer_argv)
    python, flag, *entry = trainer_argv
    if flag != "-m":
        raise ValueError(f"expected a `python -m trainer ...` command, got {trainer_argv}")
    return [python, "-m", LAUNCHER_MODULE, *launcher_options(dist), "-m", *entry]


def job_launch_argv(job_dir: Path, trainer_argv: list[str]) -> list[str]:
    """launch_argv for the job in `job_dir`, reading its resolved strategy."""
    return launch_argv(trainer_argv, job_distributed(job_dir))
