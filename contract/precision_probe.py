"""Measured fp32 and bf16 matmul rates of this machine's CPU on a model's own shape, cached per machine.

`precision: auto` on a CPU takes whichever dtype runs the model's matmuls faster here
(contract/decisions.py choose_cpu_precision). CPU flags alone cannot say: an AVX512-BF16 Xeon
without AMX runs bf16 at half its fp32 rate, an AMD EPYC without AVX512-BF16 at 1/70. The trainer
measures (trainer/devices.py precision_rates, ~1-3 s) and the estimate asks the trainer for the same
numbers (`python -m trainer probe-precision`); both read and write this cache, which the container
runner mounts, so a machine and a model shape are measured once. No torch here.
"""

from __future__ import annotations

from contract.machine_cache import cached, machine_key, store

KIND = "precision_probe"  # the cache file's name

# Rows of the probe's product: a packed step's tokens pass through each linear layer in blocks of at least this.
PROBE_ROWS = 512
# The probe's product is the model's MLP up projection cut to at most this wide and this tall: a big
# model's product would take minutes where bf16 is emulated (~1 GFLOP/s), and at these sizes the kernels
# already run at the rate of the larger products (one product here is ~1.5 GFLOP).
MAX_PROBE_IN, MAX_PROBE_OUT = 1024, 1536


def probe_shape(hidden: int, intermediate: int) -> tuple[int, int, int]:
    """(rows, in, out) of the probed product: the MLP's up projection, the model's largest matmul (capped)."""
    return PROBE_ROWS, min(hidden, MAX_PROBE_IN), min(intermediate, MAX_PROBE_OUT)


def shape_text(shape: tuple[int, int, int]) -> str:
    return "x".join(str(n) for n in shape)


def _key(shape: tuple[int, int, int]) -> str:
    return machine_key(shape_text(shape))


def cached_rates(shape: tuple[int, int, int]) -> dict | None:
    """{"fp32": GFLOP/s, "bf16": GFLOP/s, "shape": "RxIxO"} measured earlier on this machine, or None."""
    return cached(KIND, _key(shape))


def store_rates(shape: tuple[int, int, int], rates: dict, contention: float | None = None) -> bool:
    """Keep the rates unless the machine was busy while they were measured (machine_cache.store)."""
    return store(KIND, _key(shape), rates, contention)
