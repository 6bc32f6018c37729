"""Finding a Docker-API container engine: Docker, or Podman's Docker-compatible service.

The engine is `DOCKER_HOST` when set, else the first of the usual sockets that exists. The `docker`
SDK is imported only here and only when an engine is needed, so the CLI stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path

from contract.errors import UserError

API_VERSION = "1.41"
_FIX = ("start Docker, or Podman's API service (`bash scripts/container_setup.sh` sets one up on Debian), "
        "or set DOCKER_HOST; or run the job with --runner local")


def default_sockets() -> list[Path]:
    """Where Docker, rootful Podman, rootless Podman and Docker Desktop put their API sockets."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", f"/run/user/{os.getuid()}")
    return [Path("/var/run/docker.sock"), Path("/run/podman/podman.sock"), Path(runtime) / "podman" / "podman.sock",
            Path.home() / ".docker" / "run" / "docker.sock"]


def engine_url() -> tuple[str | None, str]:
    """(url, where it came from); url is None when nothing points at an engine."""
    if os.environ.get("DOCKER_HOST"):
        return os.environ["DOCKER_HOST"], "DOCKER_HOST"
    for sock in default_sockets():
        if sock.exists():
            return f"unix://{sock}", "default socket"
    return None, f"DOCKER_HOST is not set and none of {', '.join(map(str, default_sockets()))} exists"


def probe():
    """(client, description) when an engine answers, else (None, why not). Never raises."""
    url, source = engine_url()
    if url is None:
        return None, f"no container engine: {source}"
    try:
        import docker

        # A fixed API version skips the /version round trip (over a second on Podman); Docker and
        # Podman both serve 1.41.
        client = docker.DockerClient(base_url=url, version=API_VERSION, timeout=60)
        client.ping()
    except Exception as exc:  # any transport failure means the same thing: nothing answers there
        return None, f"no container engine answers at {url} ({source}): {type(exc).__name__}: {exc}"
    return client, f"the container engine at {url}"


def connect():
    """(client, description), or a UserError saying how to get an engine."""
    client, where = probe()
    if client is None:
        raise UserError(f"{where}; {_FIX}")
    return client, where


def find_image(client, tag: str):
    """The image with this tag, or None. Podman keeps local builds as localhost/<tag>."""
    import docker

    for name in (tag, f"localhost/{tag}"):
        try:
            return client.images.get(name)
        except docker.errors.ImageNotFound:
            continue
    return None


def gpu_runtime(client) -> str | None:
    """How this engine gives containers NVIDIA GPUs, or None when it shows no way to."""
    info = client.info()
    if "nvidia" in (info.get("Runtimes") or {}):
        return "the nvidia runtime"
    cdi_dirs = info.get("CDISpecDirs") or ["/etc/cdi", "/var/run/cdi"]
    for folder in map(Path, cdi_dirs):
        if folder.is_dir() and any("nvidia" in p.name for p in folder.glob("*.y*ml")):
            return f"a CDI spec in {folder}"
    return None
