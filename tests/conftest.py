"""Shared fixtures: every test gets its own LLAMAFARM_HOME; builtin models are built once per machine
(in LLAMAFARM_CACHE) and shared; the hub is never contacted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ROOT / "demos" / "datasets"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAFARM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LLAMAFARM_STRATEGIES", raising=False)
    # Jobs started without --runner run in the local process, whatever engine or image this machine
    # has; the runner tests choose their runner explicitly (README, Runners).
    monkeypatch.setenv("LLAMAFARM_RUNNER", "local")
    return tmp_path / "home"


@pytest.fixture
def run_cli():
    """Invoke the llamafarm CLI in-process; returns click's Result."""
    from orchestrator.cli import cli

    def _run(*args, **kwargs):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, **kwargs)

    return _run


@pytest.fixture
def write_jsonl(tmp_path):
    def _write(rows, name="data.jsonl"):
        path = tmp_path / name
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        return path

    return _write


@pytest.fixture(scope="session")
def tokenizers():
    """The two builtin tokenizers (building the models once if this machine has none cached)."""
    from transformers import AutoTokenizer

    from trainer.models.builtin import builtin_path

    return {
        name: AutoTokenizer.from_pretrained(builtin_path(f"builtin:{name}"))
        for name in ("tiny-llama-spm", "tiny-llama-bpe")
    }


# What a test needs beyond Python, read off the fixtures it uses, so `pytest -m "not container"` runs on
# a machine without Podman (`.ci/run` runs everything; markers are declared in pyproject.toml).
NEEDS = {"cpu_image": "container", "lf_python": "llamafactory", "llamafactory_ids": "llamafactory", "browser": "browser"}


def pytest_collection_modifyitems(items):
    for item in items:
        for fixture, marker in NEEDS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)


def broken_compiler(folder: Path, message: str) -> Path:
    """A C++ compiler that answers --version and fails every build, printing `message` last."""
    broken = folder / "g++"
    broken.write_text(f"#!/bin/sh\n[ \"$1\" = --version ] && echo 'broken 1.0' && exit 0\necho '{message}' >&2; exit 1\n")
    broken.chmod(0o755)
    return broken
