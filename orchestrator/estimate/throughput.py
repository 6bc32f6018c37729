"""How fast and how big this machine's devices are, without importing torch here.

The matmul rate is measured once per machine, device and dtype by a short trainer subprocess (about
2 s) and cached in $LLAMAFARM_CACHE/throughput.json unless another program was using the cores
throughout the probe (then it is used once and measured again next time); a device this machine lacks gets a documented
table value (an A100 for cuda, an M2 Pro for mps), which the estimate says.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from contract.machine_cache import busy

# GFLOP/s for devices that are not here to measure.
TABLE = {("cuda", "bf16"): 312_000.0, ("cuda", "fp32"): 19_500.0, ("mps", "fp32"): 6_800.0, ("mps", "bf16"): 6_800.0}


def _cache_file() -> Path:
    from contract.paths import cache_root

    return cache_root() / "throughput.json"


def _present(device: str) -> bool:
    from contract.platform import available_devices

    return available_devices()[device]


# A one-minute load average of a runnable program per core or more: other programs hold the cores now.
BUSY_LOAD_SHARE = 1.0


def matmul_gflops(device: str, dtype: str) -> float:
    if not _present(device):
        return TABLE[(device, dtype)]
    key = f"{device}-{dtype}-{os.cpu_count()}"
    path = _cache_file()
    cached = json.loads(path.read_text()) if path.exists() else {}
    if key in cached:
        return cached[key]
    rate = measure(device, dtype)
    if busy(rate["contention"]):
        # A rate taken on a busy machine would make every later estimate too long: use it once, keep none.
        print(f"this machine is busy (the probe waited {rate['contention']:.0%} of its time for a core): the time estimate "
              "assumes it stays this busy; the rate is measured again next time", file=sys.stderr)
        return rate["gflops"]
    cached[key] = rate["gflops"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(cached, indent=2))
    tmp.replace(path)
    return cached[key]


def busy_note(device: str, load: float | None = None, cores: int | None = None) -> str | None:
    """A sentence when other programs keep this machine's cores busy now (the one-minute load average
    at one per core or more): a CPU run shares them, so it takes longer than its estimate."""
    if device != "cpu":
        return None
    try:
        load = os.getloadavg()[0] if load is None else load
    except OSError:
        return None
    cores = cores or os.cpu_count() or 1
    if load < BUSY_LOAD_SHARE * cores:
        return None
    return (f"this machine is busy (load average {load:.1f} on {cores} cores): training shares the cores and "
            "will take longer than this estimate; the ETA in `monitor` follows the measured rate")


def measure(device: str, dtype: str) -> dict:
    from orchestrator.runners.local import run_trainer

    print(f"measuring this machine's {device} {dtype} matmul rate once for estimates (about 2 s)", file=sys.stderr)
    out = run_trainer("calibrate", "--device", device, "--dtype", dtype)
    return json.loads(out.strip().splitlines()[-1])


def precision_rates(hidden: int, intermediate: int) -> dict:
    """This CPU's fp32 and bf16 rates on a model's MLP matmul: the numbers the trainer decides `precision:
    auto` by (contract/precision_probe.py), read from the machine's cache or measured once by the trainer."""
    from contract.precision_probe import cached_rates, probe_shape
    from orchestrator.runners.local import run_trainer

    rates = cached_rates(probe_shape(hidden, intermediate))
    if rates:
        return rates
    print("measuring this CPU's fp32 and bf16 matmul rates on the model's shape once (a few seconds)", file=sys.stderr)
    out = run_trainer("probe-precision", "--hidden", str(hidden), "--intermediate", str(intermediate))
    return json.loads(out.strip().splitlines()[-1])


def device_memory_gb(device: str) -> float | None:
    """Memory a run can use on the device: available host RAM for cpu (and mps, which shares it),
    the GPU's total for cuda; None when it cannot be known here."""
    if device in ("cpu", "mps"):
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024 / 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
        except (ValueError, OSError):
            return None
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return int(out.stdout.split()[0]) / 1024
    return None
