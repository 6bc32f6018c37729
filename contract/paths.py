"""Where llamafarm's own files are: the project (strategies, demos, images) and the machine-wide cache."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def cache_root() -> Path:
    """Builtin models, dequantized GGUF bases, merged job outputs and managed venvs are shared by every
    LLAMAFARM_HOME on the machine (tests use many homes)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llamafarm"
    return Path(os.environ.get("LLAMAFARM_CACHE", default)).expanduser()
