"""What this machine offers, found without importing torch (so the CLI stays instant).

`start` decides the job's device from this (orchestrator/plan.py); the trainer confirms it with torch.
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path


def has_cuda() -> bool:
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def has_mps() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def available_devices() -> dict[str, bool]:
    return {"cuda": has_cuda(), "mps": has_mps(), "cpu": True}


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo; elsewhere what Python's platform module reports)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile on CPU and our kernels (trainer/native.py) build with: $CXX, else
    the first on PATH."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else []
    return next((found for name in names + ["g++", "clang++", "c++"] if (found := shutil.which(name))), None)
