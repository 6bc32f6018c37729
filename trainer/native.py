"""Our C++ kernels (trainer/*_kernel.cpp) built once per machine and compiler, and loaded with ctypes.

Each is one small file of portable C++ (GCC vector extensions, no intrinsics, no Python headers) that
includes trainer/kernel_common.h, compiled with the C++ compiler torch.compile uses, into the llamafarm
cache (which the container runner mounts), in ~1 s. OpenMP is torch's own runtime (libgomp.so.1, already loaded by torch), so a
kernel and torch share one thread pool. BuildFailed says why a kernel cannot be had here; the
decisions that use a kernel then keep torch's operators.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import subprocess
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC")
# What every kernel includes (vector types, bf16 conversions); part of each build's cache key.
COMMON_HEADER = Path(__file__).with_name("kernel_common.h")
BUILD_SECONDS = 300  # a C++ compile of one small file; far more means the compiler is stuck


class BuildFailed(Exception):
    """A kernel could not be built or loaded here; the message says why."""


_loaded: dict[tuple[Path, str], object] = {}  # by source and compiler: a process loads (and asks the compiler) once


def load_kernel(wrapper, source: Path, compiler: str):
    """`wrapper(library, path, compiler)` around the library built from `source` with `compiler`, once
    per process. BuildFailed says why not (a library missing a function the wrapper binds included)."""
    if (source, compiler) not in _loaded:
        library, path = load_library(source, compiler)
        try:
            _loaded[source, compiler] = wrapper(library, path, compiler)
        except AttributeError as error:
            raise BuildFailed(f"the built kernel {path} does not load: {error}") from None
    return _loaded[source, compiler]


def load_library(source: Path, compiler: str) -> tuple[ctypes.CDLL, Path]:
    """The library built from `source` with `compiler` for this machine, and its path: built on first
    use, loaded from the cache after. BuildFailed says why not."""
    path = _library_path(source, compiler)
    if not path.exists():
        _build(source, compiler, path)
    try:
        return ctypes.CDLL(str(path)), path
    except OSError as error:
        raise BuildFailed(f"the built kernel {path} does not load: {error}") from None


def _library_path(source: Path, compiler: str) -> Path:
    """One build per source, compiler, flags, CPU and C library: a cache shared by the host and the
    containers (which mount it) never hands one of them a library built for the other."""
    from contract.paths import cache_root
    from contract.platform import cpu_model

    key = "\n".join([source.read_text(), COMMON_HEADER.read_text(), _compiler_version(compiler), " ".join(FLAGS),
                     cpu_model(), platform.machine(), " ".join(platform.libc_ver())])
    stem = source.stem.removesuffix("_kernel")
    return cache_root() / "kernels" / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def _compiler_version(compiler: str) -> str:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BuildFailed(f"{compiler} --version failed: {error}") from None
    return done.stdout.splitlines()[0] if done.returncode == 0 and done.stdout else compiler


def _build(source: Path, compiler: str, path: Path) -> None:
    """Compile into a file of this process's own, then rename: a job building at the same time as
    another never loads a half-written library."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    command = [compiler, *FLAGS, f"-I{COMMON_HEADER.parent}", str(source), "-o", str(partial)]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_SECONDS)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise BuildFailed(f"{compiler} could not build {source.name} (exit {done.returncode}): {last}")
        partial.replace(path)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BuildFailed(f"{' '.join(command)} failed: {error}") from None
    finally:
        with contextlib.suppress(OSError):  # gone already after the rename, or never made
            partial.unlink()


def fastest_ms(works: dict, rounds: int) -> dict[str, float]:
    """`fastest_alternated` as {"<name>_ms": milliseconds}, the form the decisions keep and print."""
    return {f"{name}_ms": round(1e3 * seconds, 3) for name, seconds in fastest_alternated(works, rounds).items()}


def fastest_alternated(works: dict, rounds: int) -> dict[str, float]:
    """Seconds of each of `works` (name -> function of no arguments): each run once first (the first calls
    start the thread pool and allocate), then all alternated `rounds` times; the fastest round of each."""
    import time

    for work in works.values():
        work()
    times: dict[str, list[float]] = {name: [] for name in works}
    for _ in range(rounds):
        for name, work in works.items():
            start = time.perf_counter()
            work()
            times[name].append(time.perf_counter() - start)
    return {name: min(seconds) for name, seconds in times.items()}
