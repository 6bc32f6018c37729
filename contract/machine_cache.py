"""Measurements of this machine kept between jobs: one JSON file per kind in the llamafarm cache.

The trainer measures what CPU flags cannot tell (the matmul rate per dtype, whether torch.compile
pays) once per machine and shape, and every later job, and `estimate`, reads the number instead of
measuring again. The container runner mounts the cache, so container jobs share it. No torch here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from contract.platform import cpu_model

# Above this share of a probe's time spent waiting for a core (trainer.devices.core_wait_share), another
# program was using the cores and the measurement says more about it than about this machine: it is used
# once and not kept, so the next run measures again. An idle machine measures about 0.
BUSY_CONTENTION = 0.2


def machine_key(*parts: str) -> str:
    """The CPU, its cores and whatever else the measurement depends on, as one key."""
    return " | ".join([cpu_model(), f"{os.cpu_count()} cores", *parts])


def _file(kind: str) -> Path:
    from contract.paths import cache_root

    return cache_root() / f"{kind}.json"


def _read(kind: str) -> dict:
    try:
        return json.loads(_file(kind).read_text())
    except (OSError, ValueError):
        return {}


def cached(kind: str, key: str) -> dict | None:
    """The measurement stored under `key`, or None when this machine has not measured it."""
    return _read(kind).get(key)


def store(kind: str, key: str, value: dict, contention: float | None = None) -> bool:
    """Keep `value` under `key` unless the probe's `contention` says the machine was busy (False then).
    Kept by an atomic rename, so processes measuring at once never leave a torn file."""
    if busy(contention):
        return False
    entries = _read(kind)
    entries[key] = value
    path = _file(kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(entries, indent=2) + "\n")
    tmp.replace(path)
    return True


def kept_or_measured(kind: str, key: str, measure) -> tuple[dict, bool]:
    """(the measurement kept under `key`, True), or (`measure()`, False) after keeping it: the first job
    on this machine measures, later jobs and the other processes of a distributed job read it."""
    earlier = cached(kind, key)
    if earlier is not None:
        return earlier, True
    value = measure()
    store(kind, key, value)
    return value, False


def busy(contention: float | None) -> bool:
    return contention is not None and contention > BUSY_CONTENTION


def unkept_note(contention: float | None) -> str:
    """What a decision's reason says of a measurement taken on a busy machine ("" otherwise)."""
    if not busy(contention):
        return ""
    return f"; measured while another program held the cores ({contention:.0%} of the probe waiting), so not kept"
