"""The training images and compose.yaml, checked statically (the CUDA image cannot be built here):
hadolint on both Dockerfiles, `podman-compose config` on compose.yaml, the locks fully pinned, and the
names that must agree across files. The tools come from requirements/container-tools.txt."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.images import IMAGES, build_argv, lock_files

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if not path:
        pytest.fail(f"{name} is missing: `.venv/bin/pip install -r requirements/container-tools.txt` "
                    "(scripts/container_setup.sh does it)")
    return path


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_dockerfile_passes_hadolint(kind):
    proc = subprocess.run([_tool("hadolint"), IMAGES[kind].dockerfile], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_dockerfile_shape(kind):
    """Base as a build argument, the lock installed offline, non-root, the shared entrypoint, labels."""
    text = (ROOT / IMAGES[kind].dockerfile).read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0].startswith("ARG BASE_IMAGE=") and lines[1] == "FROM ${BASE_IMAGE}"
    assert f"--mount=type=bind,source=build/wheelhouse/{kind},target=/wheels" in text
    assert "--no-index --find-links /wheels" in text
    assert f"-r /opt/llamafarm/{IMAGES[kind].lock}" in text
    assert re.search(r"^USER 1000:1000$", text, re.M)
    assert lines[-2:] == ['ENTRYPOINT ["python", "-m", "trainer"]', 'CMD ["--help"]']
    for label in ("version=\"${LLAMAFARM_VERSION}\"", "revision=\"${LLAMAFARM_COMMIT}\""):
        assert f"org.opencontainers.image.{label}" in text
    if kind == "cuda":
        assert "NVIDIA_VISIBLE_DEVICES=all" in text and "bitsandbytes==" in (ROOT / IMAGES[kind].lock).read_text()


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_locks_pin_every_package(kind):
    for path in lock_files(ROOT / IMAGES[kind].lock):
        for line in path.read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-r "):
                assert re.fullmatch(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.+-]+", line), f"{path}: {line!r} is not pinned"


def test_build_command():
    argv = build_argv(IMAGES["cpu"], "podman", "localhost/llamafarm-base:bookworm")
    assert argv[:6] == ["podman", "build", "--file", "images/cpu/Dockerfile", "--tag", IMAGES["cpu"].tag]
    assert "BASE_IMAGE=localhost/llamafarm-base:bookworm" in argv and argv[-1] == "."
    assert any(a.startswith("LLAMAFARM_COMMIT=") for a in argv)


def test_compose_config(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "LLAMAFARM_JOBS": str(tmp_path / "jobs"), "LLAMAFARM_DATA": str(tmp_path / "data")}
    proc = subprocess.run([_tool("podman-compose"), "-f", "compose.yaml", "config"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(proc.stdout)
    cpu, cuda = config["services"]["cpu"], config["services"]["cuda"]
    assert (cpu["image"], cuda["image"]) == (IMAGES["cpu"].tag, IMAGES["cuda"].tag)
    assert (cpu["build"]["dockerfile"], cuda["build"]["dockerfile"]) == (IMAGES["cpu"].dockerfile, IMAGES["cuda"].dockerfile)
    assert cuda["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert cuda["ipc"] == "host" and cuda["ulimits"]["memlock"] == -1
    assert f"jobs:{tmp_path / 'jobs'}" in cpu["volumes"] and f"{tmp_path / 'data'}:{tmp_path / 'data'}:ro" in cpu["volumes"]
    assert config["volumes"]["jobs"]["driver_opts"]["device"] == str(tmp_path / "jobs")
    assert cpu["environment"]["HF_TOKEN"] is None  # passed through only when set
    unset = subprocess.run([_tool("podman-compose"), "-f", "compose.yaml", "config"], cwd=ROOT,
                           env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert unset.returncode != 0 and "set LLAMAFARM_JOBS to the absolute path" in unset.stderr
