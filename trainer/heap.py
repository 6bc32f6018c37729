"""Freed memory kept in the process between training steps (glibc's malloc, on CPU).

Every step allocates and frees tensors of the same sizes: activations, autocast's bf16 copies of the
weights, the gradients. glibc's malloc gives a block over 32 MB (its largest mmap threshold) back to
the kernel when it is freed and trims the heap's free top (past 128 KB at first, 64 MB at most as it
adapts), so the next step's tensor of that size is faulted in again, page by page, each page
zero-filled by the kernel first. On the VMs this project was measured on, this module's probe fills a
fresh 64 MB block in 22-54 ms against 2-8 ms for a reused one, and a full fine-tune at batch 1 spent
about a quarter of its step on such faults (torch.profiler). Keeping freed memory
in the heap (no mmap per large block, no trimming) lets each step reuse the last step's pages; the
peak RSS is the same high-water mark. Evaluations, whose batches are shaped otherwise, run with
malloc's defaults (malloc_defaults), else they would grow the kept heap.

Why malloc's own tunables and not an allocator library: jemalloc or tcmalloc has to be preloaded
before the process starts, and neither gained consistently here (docs/PERFORMANCE.md); `mallopt`
applies from inside the one training entrypoint, on every runner. Whether it pays is measured on
the machine at hand: where page faults are cheap (e.g. transparent huge pages for every allocation)
malloc stays as it is.
"""

from __future__ import annotations

import ctypes
import os
import time
from contextlib import contextmanager

from contract.decisions import Decision

M_TRIM_THRESHOLD = -1  # <malloc.h>: free heap top above this many bytes goes back to the kernel
M_MMAP_MAX = -4  # <malloc.h>: most blocks served by mmap at once; 0 serves every block from the heap
_TRIM_NEVER = 2**31 - 1  # mallopt takes an int; 2 GB of free top is kept
PROBE_BYTES = 64 << 20  # over glibc's 32 MB mmap ceiling, so a fresh block is a fresh mapping
KEEP_WHEN_SLOWER = 1.5  # a fresh block's fill time over a reused one's above which memory is kept
_kept_by = None  # the C library once keep() has applied: only then is freed memory held back here
_DEFAULT_MMAP_MAX = 65536  # glibc's own values of the two tunables keep() sets
_DEFAULT_TRIM_THRESHOLD = 128 * 1024


def keep_freed_memory(device: str) -> Decision:
    """Decide, and apply, whether malloc keeps freed memory for the next step."""
    if device != "cpu":
        return Decision("default", f"on {device} tensors live in torch's caching allocator, not malloc")
    tuned = sorted(name for name in os.environ if name.startswith("MALLOC_") or name == "GLIBC_TUNABLES")
    if tuned:
        return Decision("default", f"{', '.join(tuned)} set in the environment: malloc left as set there")
    libc = _glibc()
    if libc is None:
        return Decision("default", "the C library is not glibc, whose malloc tunables this lever sets")
    fresh, reused = fill_seconds()
    numbers = (f"filling a fresh {PROBE_BYTES >> 20} MB block took {1e3 * fresh:.1f} ms here, "
               f"a reused one {1e3 * reused:.1f} ms")
    if fresh < KEEP_WHEN_SLOWER * reused:
        return Decision("default", f"page faults are cheap here: {numbers}")
    keep(libc)
    return Decision("kept", f"glibc's malloc keeps freed blocks for the next step (no mmap per large tensor, no "
                            f"trimming; its defaults around evaluations), since {numbers}")


def keep(libc) -> None:
    """Serve every block from malloc's heap and never shrink it."""
    global _kept_by
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, _TRIM_NEVER)):
        raise OSError("mallopt refused M_MMAP_MAX or M_TRIM_THRESHOLD")
    _kept_by = libc


@contextmanager
def malloc_defaults():
    """malloc's own behaviour (large blocks mapped and unmapped, the heap trimmed) for work whose tensors
    are not a training step's, then kept memory again. An evaluation's batches differ in shape from
    the steps and from each other, so in a kept heap their blocks miss the freed ones and the heap grows:
    a full fine-tune at 512 x 1 with 13 held-out rows peaked at up to 3,727 MB (256 x 1: up to 3,917)
    against 3,275-3,308 with no evaluation and 3,298-3,348 with malloc's defaults throughout. The free
    pages the steps left are given back first (malloc_trim); the next step faults them in once."""
    libc = _kept_by
    if libc is None:
        yield
        return
    libc.malloc_trim(0)
    libc.mallopt(M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    libc.mallopt(M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
    try:
        yield
    finally:
        keep(libc)


def fill_seconds() -> tuple[float, float]:
    """Median seconds to fill a freshly allocated block and the same-sized block already in use."""
    import torch

    elements = PROBE_BYTES // 4
    reused = torch.ones(elements)

    def fresh_fill():
        torch.empty(elements).fill_(1.0)

    def timed(fill) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fill()
            times.append(time.perf_counter() - start)
        return sorted(times)[1]

    return timed(fresh_fill), timed(lambda: reused.fill_(1.0))


def _glibc():
    """The process's C library when it is glibc, else None (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # TypeError: Windows has no process-wide handle
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None
