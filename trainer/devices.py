"""What only the training process can know: the devices torch sees, a device's precision support, its matmul rate."""

from __future__ import annotations

from pathlib import Path

from contract.decisions import Decision, choose_cpu_precision
from contract.errors import UserError
from contract.precision_probe import cached_rates, probe_shape, shape_text, store_rates


def available() -> dict[str, bool]:
    """The devices torch sees in this process (the host asks the OS instead: contract/platform.py)."""
    import torch

    return {
        "cuda": torch.cuda.is_available(),
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "cpu": True,
    }


def confirm_device(planned: Decision) -> Decision:
    """The plan's device, checked against what torch sees in this process (a container without the
    GPU passed through, a CPU-only torch wheel): a mismatch is an error, not a silent second choice."""
    if available()[planned.value]:
        return planned
    raise UserError(f"the job's plan trains on {planned.value} ({planned.reason}), but this process's torch sees "
                    f"no {planned.value} device; install a torch build for {planned.value}, or set "
                    "fine_tuner.config.device: cpu and start the job again")


def choose_precision(requested: str, device: str, config=None) -> Decision:
    """config: the model's, whose matmul shape a CPU's auto precision is measured on."""
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
    if requested != "auto":
        return choose_cpu_precision(requested)
    intermediate = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    return choose_cpu_precision(requested, precision_rates(probe_shape(config.hidden_size, intermediate)))


def precision_rates(shape: tuple[int, int, int]) -> dict:
    """fp32 and bf16 GFLOP/s of one (rows x in) @ (in x out) product on this CPU, from the machine's cache
    (contract/precision_probe.py) or measured now: the two dtypes alternate, best of two rounds each,
    so a moment of someone else's work changes both alike; a round of a slow dtype is one product."""
    import torch

    rates = cached_rates(shape)
    if rates:
        return rates
    rows, inner, outer = shape
    gen = torch.Generator().manual_seed(0)
    operands = {name: (torch.randn(rows, inner, generator=gen).to(dtype), torch.randn(inner, outer, generator=gen).to(dtype))
                for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    best = dict.fromkeys(operands, 0.0)
    for a, b in operands.values():
        a @ b  # first call: kernel selection and packing, not timed
    before = scheduler_snapshot()
    for _ in range(2):
        for name, (a, b) in operands.items():
            best[name] = max(best[name], product_rate(a, b, 0.1))
    rates = {**{name: round(rate, 1) for name, rate in best.items()}, "shape": shape_text(shape)}
    contention = core_wait_share(before)
    if not store_rates(shape, rates, contention):
        rates["contention"] = contention  # the decision's reason says so
    return rates


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


def scheduler_snapshot() -> tuple[int, int] | None:
    """Nanoseconds this process's threads have run and waited for a core (Linux's schedstat), or None."""
    ran = waited = 0
    try:
        for stat in Path("/proc/self/task").glob("*/schedstat"):
            fields = stat.read_text().split()
            ran, waited = ran + int(fields[0]), waited + int(fields[1])
    except (OSError, ValueError, IndexError):
        return None
    return (ran, waited) if ran else None


def product_rate(a, b, seconds: float) -> float:
    """GFLOP/s of `a @ b` repeated for about `seconds` (at least once; a GPU is waited for)."""
    import time

    import torch

    count, start = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if a.is_cuda:
        torch.cuda.synchronize()
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] * count / (time.perf_counter() - start) / 1e9


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
    before, best, probe_start = scheduler_snapshot(), 0.0, time.perf_counter()
    while time.perf_counter() - probe_start < seconds:  # slow kernels (bf16 on old CPUs) get fewer windows
        best = max(best, product_rate(a, b, seconds / windows))
    contention = core_wait_share(before) if device == "cpu" else None
    return {"gflops": round(best, 1), "contention": contention}


def core_wait_share(before: tuple[int, int] | None) -> float | None:
    """The share of this process's time since `before` that its threads spent waiting for a core
    another program held (Linux's schedstat; None elsewhere): near 0 on a quiet machine, 0.5 when
    another busy program takes half the cores' time."""
    after = scheduler_snapshot()
    if not (before and after):
        return None
    ran, waited = after[0] - before[0], after[1] - before[1]
    return round(waited / max(ran + waited, 1), 2)


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
