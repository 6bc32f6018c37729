"""The container runner: the shared entrypoint in the CPU or CUDA image, through a Docker-API engine.

`container_spec` is pure (job folder, strategy and host facts in; image, mounts, user, devices,
limits out), so tests assert it without an engine or a GPU. `start` launches a small supervisor
process on the host (orchestrator/runners/container_supervisor.py) that creates the container,
copies its output into train.log and turns its exit code into the job's status; the supervisor's
pid is the job's pid, so `jobs`, `monitor` and `stop` treat the job like a local one.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from contract.errors import UserError
from contract.job_folder import LOG_FILE, SUPERVISED_ENV, pid_alive, read_job, read_job_strategy
from contract.plan import plan_of
from orchestrator.runners.base import LaunchSpec
from orchestrator.runners.local import PROJECT_ROOT, LocalRunner, trainer_env

CACHE_IN_CONTAINER = "/cache/llamafarm"
HF_HOME_IN_CONTAINER = "/cache/huggingface"


@dataclass(frozen=True)
class HostFacts:
    """What the spec needs to know about the calling host; tests pass their own."""

    uid: int
    gid: int
    llamafarm_home: Path
    """Its cache/ folder (tokenized rows) is shared with the container, at the same path."""
    llamafarm_cache: Path
    hf_home: Path | None
    """The host's Hugging Face cache, mounted only when it exists."""
    engine_url: str

    @classmethod
    def here(cls, engine_url: str) -> "HostFacts":
        from contract.job_folder import llamafarm_home
        from contract.paths import cache_root

        hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser()
        return cls(os.getuid(), os.getgid(), llamafarm_home().resolve(), cache_root(),
                   hf_home if hf_home.is_dir() else None, engine_url)


@dataclass(frozen=True)
class ContainerSpec:
    engine_url: str
    image: str
    name: str
    command: list[str]
    user: str
    mounts: list[dict]
    """{source, target, read_only}; bind mounts at the same path inside, so job.json's paths hold there."""
    environment: dict[str, str]
    pass_env: list[str]
    """Names of host variables copied in at start, only where set (their values never enter a file)."""
    ulimits: list[dict] = field(default_factory=list)
    device_requests: list[dict] = field(default_factory=list)
    ipc_mode: str | None = None
    shm_size: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] | None = None
    """Replaces the image's `python -m trainer` for distributed jobs: the launcher around it."""
    network_mode: str | None = None
    """host for jobs across machines: the launcher must reach, and be reached by, the other machines."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ContainerSpec":
        return cls(**json.loads(text))

    def create_kwargs(self, environ: dict[str, str]) -> dict:
        """Keyword arguments of the docker SDK's `containers.create`."""
        from docker.types import DeviceRequest, Mount, Ulimit

        env = {**self.environment, **{k: environ[k] for k in self.pass_env if environ.get(k)}}
        kwargs = {
            "image": self.image, "command": self.command, "name": self.name, "user": self.user,
            "environment": env, "labels": self.labels, "detach": True,
            "mounts": [Mount(target=m["target"], source=m["source"], type="bind", read_only=m["read_only"])
                       for m in self.mounts],
            "ulimits": [Ulimit(**u) for u in self.ulimits],
            "device_requests": [DeviceRequest(**d) for d in self.device_requests],
        }
        if self.ipc_mode:
            kwargs["ipc_mode"] = self.ipc_mode
        if self.shm_size:
            kwargs["shm_size"] = self.shm_size
        if self.entrypoint:
            kwargs["entrypoint"] = self.entrypoint
        if self.network_mode:
            kwargs["network_mode"] = self.network_mode
        return kwargs


def container_running(job: dict) -> bool:
    """Whether the job's container still runs in its engine (asked only when its supervisor is gone:
    killing the supervisor on the host does not stop a container, so the job goes on training)."""
    if not job.get("container"):
        return False
    from orchestrator.runners import engine

    try:
        client, _ = engine.connect()
        return client.containers.get(job["container"]["name"]).status in ("created", "running")
    except Exception:  # no engine, or no such container: nothing runs there
        return False


def container_name(job_id: str) -> str:
    return f"llamafarm-{job_id}"  # job ids are already valid container names


def image_for(cfg, device: str) -> tuple[str, str]:
    """(image tag, image kind) for a strategy on a device."""
    from orchestrator.images import IMAGES

    kind = "cuda" if device == "cuda" else "cpu"
    return cfg.container.image or IMAGES[kind].tag, kind


def _parse_ulimit(name: str, value: int | str) -> dict:
    soft, _, hard = str(value).partition(":")
    return {"name": name, "soft": int(soft), "hard": int(hard or soft)}


def container_spec(job_dir: Path, job: dict, cfg, device: str, host: HostFacts, image: str | None = None) -> ContainerSpec:
    """The container a job runs in. Pure: everything it depends on is an argument. `image`: the job
    plan's; without it, the one `image_for` gives (what the plan holds for a job `start` made)."""
    settings = cfg.container
    job_dir = Path(job_dir).resolve()
    shared_cache = host.llamafarm_home / "cache"
    mounts = [{"source": str(job_dir), "target": str(job_dir), "read_only": False},
              {"source": str(shared_cache), "target": str(shared_cache), "read_only": False},
              {"source": str(host.llamafarm_cache), "target": CACHE_IN_CONTAINER, "read_only": False}]
    environment = {"PYTHONUNBUFFERED": "1", SUPERVISED_ENV: "1", "LLAMAFARM_CACHE": CACHE_IN_CONTAINER,
                   "LLAMAFARM_HOME": str(host.llamafarm_home)}
    if host.hf_home:
        mounts.append({"source": str(host.hf_home), "target": HF_HOME_IN_CONTAINER, "read_only": False})
        environment["HF_HOME"] = HF_HOME_IN_CONTAINER
    # A LlamaFactory registry entry (dataset_info.json:NAME) names files beside it: its folder is mounted.
    inputs = [str(Path(p.rsplit(":", 1)[0]).parent) if p and p.rsplit(":", 1)[0].endswith("dataset_info.json") else p
              for p in (job.get("dataset"), job.get("eval_dataset"))]
    if Path(cfg.base_model.huggingface_id).is_absolute():  # a local base model folder (start pins it absolute)
        inputs.append(cfg.base_model.huggingface_id)
    for path in dict.fromkeys(p for p in inputs if p):
        mounts.append({"source": path, "target": path, "read_only": True})
    devices = []
    if device == "cuda":
        gpus = settings.gpus
        devices.append({"count": -1, "capabilities": [["gpu"]]} if gpus == "all"
                       else {"device_ids": [str(g) for g in gpus], "capabilities": [["gpu"]]})
    kind = image_for(cfg, device)[1]
    image = image or image_for(cfg, device)[0]
    return ContainerSpec(
        engine_url=host.engine_url,
        image=image,
        name=container_name(job_dir.name),
        command=["train", str(job_dir)],
        user=f"{host.uid}:{host.gid}",
        mounts=mounts,
        environment=environment,
        pass_env=list(settings.pass_env),
        ulimits=[_parse_ulimit(k, v) for k, v in settings.ulimits.items()],
        device_requests=devices,
        ipc_mode="host" if settings.ipc == "host" else None,
        shm_size=settings.shm_size if settings.ipc == "private" else None,
        labels={"ai.llamafarm.job": job_dir.name, "ai.llamafarm.image-kind": kind},
        **_distributed_container(cfg.distributed),
    )


def _distributed_container(dist) -> dict:
    """One container per machine: the image's `python -m trainer` inside PyTorch's launcher
    (orchestrator/launcher.py), on the host's network when machines must meet."""
    from orchestrator.launcher import launch_argv

    if dist.mode == "none":
        return {}
    argv = launch_argv(["python", "-m", "trainer"], dist)
    return {"entrypoint": argv, "network_mode": "host" if dist.nnodes > 1 else None}


class ContainerRunner:
    name = "container"

    def available(self, cfg, device: str) -> tuple[bool, str]:
        """Whether auto may pick this runner, and why; never raises."""
        from orchestrator.runners import engine

        client, where = engine.probe()
        if client is None:
            return False, where
        tag, kind = image_for(cfg, device)
        if engine.find_image(client, tag) is None:
            return False, f"image {tag} is not built in {where} (`llamafarm images build {kind}`)"
        if device == "cuda" and engine.gpu_runtime(client) is None:
            return False, f"{where} has no NVIDIA GPU runtime"
        return True, f"{where} has {tag}"

    def preflight(self, cfg, plan) -> str:
        """Refuse, before any job exists, what cannot start: no engine, no image, no GPU runtime."""
        from orchestrator.runners import engine

        device = plan.device.value
        if device == "mps":
            raise UserError("the MPS device cannot be used from a container (Metal is not passed through); "
                            "use --runner native, or set device: cpu")
        client, where = engine.connect()
        tag, kind = plan.image.value, image_for(cfg, device)[1]
        image = engine.find_image(client, tag)
        if image is None:
            hint = (f"build it with `llamafarm images build {kind}`" if not cfg.container.image
                    else "build or pull it, or change container.image in the strategy")
            raise UserError(f"image {tag} is not in {where}; {hint}")
        if device == "cuda" and engine.gpu_runtime(client) is None:
            raise UserError(
                f"the strategy trains on cuda but {where} has no NVIDIA GPU runtime; "
                "install the NVIDIA Container Toolkit (`nvidia-ctk runtime configure`), or use --runner local"
            )
        commit = (image.labels or {}).get("org.opencontainers.image.revision", "unknown")
        return f"image {tag} (commit {commit}) on {where}{_other_commit_note(commit, kind)}"

    def container_spec(self, job_dir: Path) -> ContainerSpec:
        from orchestrator.runners import engine

        job = read_job(job_dir)
        plan = plan_of(job)
        url, _ = engine.engine_url()
        host = HostFacts.here(url or "")
        for folder in (host.llamafarm_cache, host.llamafarm_home / "cache"):
            folder.mkdir(parents=True, exist_ok=True)  # else the engine creates it, owned by root
        return container_spec(job_dir, job, read_job_strategy(job_dir)[0].cfg, plan.device.value, host, plan.image.value)

    def launch_spec(self, job_dir: Path) -> LaunchSpec:
        spec = self.container_spec(job_dir)
        return LaunchSpec(
            argv=[sys.executable, "-m", "orchestrator.runners.container_supervisor", str(Path(job_dir).resolve()),
                  spec.to_json()],
            cwd=PROJECT_ROOT,
            env=trainer_env(),
            log_path=Path(job_dir) / LOG_FILE,
        )

    def start(self, spec: LaunchSpec) -> int:
        return LocalRunner().start(spec)  # the supervisor runs detached exactly like a local trainer

    def stop(self, job: dict) -> None:
        """The supervisor passes SIGTERM on to the container (the trainer checkpoints, then ends);
        when the supervisor is gone, the container is signalled through the engine directly."""
        if pid_alive(job.get("pid")):
            os.kill(job["pid"], signal.SIGTERM)
            return
        from orchestrator.runners import engine

        client, _ = engine.connect()
        try:
            client.containers.get(container_name(job["job_id"])).kill(signal="SIGTERM")
        except Exception:  # already gone: nothing left to stop
            pass


def _other_commit_note(image_commit: str, kind: str) -> str:
    """The image carries the trainer code of the commit it was built from; a checkout at another commit
    trains with the image's code until the image is rebuilt, which the start line says (not refused:
    running an older image can be deliberate)."""
    from orchestrator.images import commit

    here = commit()
    if "unknown" in (image_commit, here) or image_commit == here:
        return ""
    return (f"; this checkout is at commit {here}, so the job runs the image's trainer code, not the checkout's "
            f"(`llamafarm images build {kind}` rebuilds it)")
