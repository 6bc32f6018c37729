"""What this host offers, found without importing torch (so the CLI stays instant).

The trainer makes the final device decision with torch; this only lets `start` refuse early a
strategy that cannot run here, and lets runner choice follow the device.
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path


def has_cuda() -> bool:
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def has_mps() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def available_devices() -> dict[str, bool]:
    return {"cuda": has_cuda(), "mps": has_mps(), "cpu": True}
