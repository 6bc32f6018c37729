"""Device and precision decisions, each returned with the reason that gets printed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from contract.errors import UserError


@dataclass(frozen=True)
class Decision:
    value: str
    reason: str


def _available() -> dict[str, bool]:
    import torch

    return {
        "cuda": torch.cuda.is_available(),
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "cpu": True,
    }


def choose_device(requested: str, fallback: str | None, available: dict[str, bool] | None = None) -> Decision:
    available = available if available is not None else _available()
    if requested == "auto":
        for name in ("cuda", "mps"):
            if available[name]:
                return Decision(name, f"{name} is available; auto picks cuda, then mps, then cpu")
        return Decision("cpu", "no CUDA and no MPS device found; auto picks cuda, then mps, then cpu")
    if available[requested]:
        return Decision(requested, "set in the strategy")
    if fallback:
        return Decision(fallback, f"{requested} was asked for but is not available; strategy falls back to {fallback}")
    raise UserError(
        f"device {requested!r} is not available on this machine; set fine_tuner.config.device to auto or cpu, "
        "or set fallback_device: cpu"
    )


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX makes bf16 matmuls several times faster than fp32 on a CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16"))


def choose_precision(requested: str, device: str) -> Decision:
    import torch

    if device == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if requested in ("auto", "bf16"):
            if bf16_ok:
                return Decision("bf16", "the GPU supports bf16" if requested == "auto" else "set in the strategy")
            if requested == "bf16":
                raise UserError("precision bf16 was asked for but this GPU does not support it; use fp16 or auto")
            return Decision("fp16", "the GPU has no bf16 support")
        return Decision(requested, "set in the strategy")
    if device == "mps":
        if requested in ("bf16", "fp16"):
            ok, detail = probe_precision("mps", requested)
            if not ok:
                raise UserError(f"precision {requested} is not reliable on MPS here: a {requested} training step "
                                f"failed its check on this device ({detail}); use fp32 or auto")
            return Decision(requested, f"set in the strategy; a {requested} training step checked out on this device ({detail})")
        if requested == "auto":
            return Decision("fp32", "MPS autocast is not reliable for training; fp32 is the safe default")
        return Decision(requested, "set in the strategy")
    # cpu
    if requested == "fp16":
        raise UserError("precision fp16 is not supported for CPU training; use bf16, fp32 or auto")
    if requested == "auto":
        if cpu_has_bf16():
            return Decision("bf16", "the CPU has AVX512-BF16 or AMX; bf16 autocast over fp32 weights")
        return Decision("fp32", "the CPU has no AVX512-BF16 or AMX, so bf16 would be slower")
    return Decision(requested, "set in the strategy")


def probe_precision(device: str, precision: str) -> tuple[bool, str]:
    """(usable, detail): one small forward and backward pass under `precision` autocast, compared with
    fp32. Support for half types on MPS varies with macOS and chip, so it is checked, not assumed."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=gen)
    w = torch.randn(128, 128, generator=gen) / 128**0.5

    def grad(autocast: bool):
        weight = w.to(device).clone().requires_grad_(True)  # a fresh leaf each time: no shared .grad
        with torch.autocast(device_type=device, dtype=dtype, enabled=autocast):
            loss = (x.to(device) @ weight).float().pow(2).mean()
        loss.backward()
        return weight.grad.float().cpu()

    try:
        reference, half = grad(False), grad(True)
    except (RuntimeError, TypeError, ValueError) as exc:
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no message'}"
    if not torch.isfinite(half).all():
        return False, "non-finite gradients"
    error = ((half - reference).abs().max() / reference.abs().max()).item()
    if error > 0.05:  # bf16 keeps about 3 significant digits; 5% means the kernels are wrong, not imprecise
        return False, f"gradients {error:.1%} off fp32"
    return True, f"gradients within {error:.2%} of fp32"


def _scheduler_times() -> tuple[int, int] | None:
    """Nanoseconds this process's threads have run and waited for a core (Linux's schedstat), or None."""
    ran = waited = 0
    try:
        for stat in Path("/proc/self/task").glob("*/schedstat"):
            fields = stat.read_text().split()
            ran, waited = ran + int(fields[0]), waited + int(fields[1])
    except (OSError, ValueError, IndexError):
        return None
    return (ran, waited) if ran else None


def matmul_rate(device: str, dtype: str, seconds: float = 1.5, windows: int = 10) -> dict:
    """Sustained matmul rate on `device` (square products sized like a small model's layers), as the best
    of short windows so that a moment of someone else's work does not count; and, on Linux, the share of
    the probe's time its threads spent waiting for a core another program held (`contention`): high
    contention means the rate says more about that program than about this machine."""
    import time

    import torch

    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(1024, 1024, dtype=torch_dtype, device=device)
    b = torch.randn(1024, 1024, dtype=torch_dtype, device=device)
    for _ in range(3):
        a @ b
    before, best, probe_start = _scheduler_times(), 0.0, time.perf_counter()
    while time.perf_counter() - probe_start < seconds:  # slow kernels (bf16 on old CPUs) get fewer windows
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / windows:
            a @ b
            count += 1
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * 1024**3 * count / (time.perf_counter() - start) / 1e9)
    after = _scheduler_times()
    contention = None
    if device == "cpu" and before and after:
        ran, waited = after[0] - before[0], after[1] - before[1]
        contention = round(waited / max(ran + waited, 1), 2)
    return {"gflops": round(best, 1), "contention": contention}


def peak_rss_mb(status: Path = Path("/proc/self/status")) -> float:
    """This process's peak resident memory in MB: Linux's VmHWM, the high-water mark of this program's own
    address space. Not ru_maxrss: Linux carries that across exec, so a trainer started by a process that
    had grown large (a test run, the dashboard: 1.6 GB measured for a 0.5 GB tiny run started from a
    1.5 GB parent) reports its parent's peak. Elsewhere ru_maxrss (bytes on macOS, KiB on Linux)."""
    import resource
    import sys

    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(maxrss / (2**20 if sys.platform == "darwin" else 1024), 1)
