"""Building a cached model folder once, safely, and hashing the files it came from.

Every cached folder (builtins, dequantized GGUF bases, merged job outputs) is built in a temporary
sibling and renamed into place, so readers see a complete folder or none, and two processes building
the same deterministic folder at once both succeed with one copy.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_once(target: Path, complete_marker: str, build: Callable[[Path], None]) -> Path:
    """`target`, built by `build(tmp)` unless `target/complete_marker` already exists.

    A target folder without its marker (weights deleted by hand, say) is a damaged entry and replaced."""
    if (target / complete_marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        build(tmp)
        if target.exists() and not (target / complete_marker).exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / complete_marker).exists():
                raise
            # Another process finished the same deterministic build first; theirs is identical.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
