"""The training images: which Dockerfile, lock and tag each has, and how one is built.

    llamafarm images build cpu [--base-image IMAGE]

Builds are hermetic: the image's lock is downloaded into build/wheelhouse/<kind> on the host
(`pip download`, binary wheels only), and the Dockerfile installs from there with no network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from contract.errors import UserError
from contract.paths import PROJECT_ROOT



@dataclass(frozen=True)
class ImageSpec:
    kind: str
    dockerfile: str
    """Relative to the project root, which is the build context."""
    lock: str
    """The requirements file the image installs; `-r` includes are followed."""
    download_args: tuple[str, ...] = ()
    """Extra `pip download` flags for this image's wheelhouse."""

    @property
    def tag(self) -> str:
        return f"llamafarm-{self.kind}:{version()}"

    @property
    def wheelhouse(self) -> Path:
        return PROJECT_ROOT / "build" / "wheelhouse" / self.kind


IMAGES: dict[str, ImageSpec] = {
    s.kind: s
    for s in (
        # A full freeze: exactly its pins, nothing resolved (the Dockerfile installs with --no-deps too).
        ImageSpec("cpu", "images/cpu/Dockerfile", "images/cpu/requirements.txt", ("--no-deps",)),
        # The machine's pip config may point at local CPU-only torch wheels; the CUDA image needs PyPI's.
        ImageSpec("cuda", "images/cuda/Dockerfile", "images/cuda/requirements.txt",
                  ("--isolated", "--index-url", "https://pypi.org/simple")),
    )
}


def get_image(kind: str) -> ImageSpec:
    try:
        return IMAGES[kind]
    except KeyError:
        raise UserError(f"unknown image {kind!r}; valid: {', '.join(IMAGES)}") from None


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("llamafarm")
    except PackageNotFoundError:  # a plain checkout run as `python cli.py`
        return "dev"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def lock_files(lock: Path) -> list[Path]:
    """A lock and every file it includes with `-r`, in order."""
    found, todo = [], [lock]
    while todo:
        path = todo.pop(0).resolve()
        found.append(path)
        for line in path.read_text().splitlines():
            if line.strip().startswith("-r "):
                todo.append(path.parent / line.strip()[3:].strip())
    return found


def lock_digest(lock: Path) -> str:
    """Changes whenever the lock or a file it includes changes."""
    digest = hashlib.sha256()
    for path in lock_files(lock):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def download_wheels(spec: ImageSpec, echo=print) -> Path:
    """Fill the image's wheelhouse from its lock; skipped when it already holds this lock's wheels."""
    target = spec.wheelhouse
    stamp = target / ".lock-digest"
    digest = lock_digest(PROJECT_ROOT / spec.lock)
    if stamp.is_file() and stamp.read_text().strip() == digest:
        echo(f"wheelhouse: {target} (up to date with {spec.lock})")
        return target
    echo(f"wheelhouse: downloading {spec.lock} into {target}")
    fresh = target.with_name(target.name + ".partial")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    # Binary wheels only: an sdist would need a compiler and the network inside the build.
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--only-binary=:all:", "--dest", str(fresh), "-r", str(PROJECT_ROOT / spec.lock), *spec.download_args]
    proc = subprocess.run(argv, cwd=PROJECT_ROOT, stderr=subprocess.PIPE, text=True)
    # This machine's pip config names local index folders that may be absent; hide that noise only.
    noise = "WARNING: Location "
    sys.stderr.write("".join(line for line in proc.stderr.splitlines(True) if not line.startswith(noise)))
    if proc.returncode:
        shutil.rmtree(fresh, ignore_errors=True)
        raise UserError(f"pip could not download the wheels of {spec.lock} (exit {proc.returncode}); see its output above")
    (fresh / ".lock-digest").write_text(digest + "\n")
    shutil.rmtree(target, ignore_errors=True)
    fresh.rename(target)
    return target


def engine_cli() -> tuple[str, str]:
    """The command that builds images, and why it was picked."""
    forced = os.environ.get("LLAMAFARM_BUILD_CLI")
    if forced:
        return forced, "LLAMAFARM_BUILD_CLI"
    for cli in ("podman", "docker"):
        if shutil.which(cli):
            return cli, f"{cli} is installed" + (" (podman is preferred: it builds without a daemon)" if cli == "podman" else "")
    raise UserError("neither podman nor docker is installed; install one (on Debian: `bash scripts/container_setup.sh`)")


def build_argv(spec: ImageSpec, cli: str, base_image: str | None) -> list[str]:
    argv = [cli, "build", "--file", spec.dockerfile, "--tag", spec.tag,
            "--build-arg", f"LLAMAFARM_VERSION={version()}", "--build-arg", f"LLAMAFARM_COMMIT={commit()}"]
    if base_image:
        argv += ["--build-arg", f"BASE_IMAGE={base_image}"]
    return argv + ["."]


def build(kind: str, base_image: str | None, echo=print) -> str:
    """Download the wheelhouse, build the image, return its tag."""
    spec = get_image(kind)
    cli, why = engine_cli()
    echo(f"build tool: {cli} ({why})")
    download_wheels(spec, echo)
    argv = build_argv(spec, cli, base_image)
    echo("build: " + " ".join(argv))
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}  # RUN --mount needs BuildKit under Docker
    if subprocess.run(argv, cwd=PROJECT_ROOT, env=env).returncode:
        raise UserError(f"building {spec.tag} failed; see the {cli} output above")
    return spec.tag
