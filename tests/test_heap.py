"""The heap lever (trainer/heap.py): what it decides, that keeping freed memory really keeps it, and that
malloc_defaults gives it back for a stretch of other work.

malloc's state is process-wide, so each check that sets it runs in a fresh interpreter. glibc's own
accounting (`mallinfo2`, read before and after) tells where a block came from: `hblkhd` counts bytes in
mmapped blocks, `arena` the heap's size; a 128 MB block is four times glibc's largest mmap threshold, so by default
it is always a mapping of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

_WHERE_A_BLOCK_LIVES = """
import ctypes, json, sys
import torch
from trainer import heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

def resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    heap.keep(libc)
before = libc.mallinfo2()
block = torch.ones(32 << 20)  # 128 MB
held = libc.mallinfo2()
del block
freed, resident_freed = libc.mallinfo2(), resident()
with heap.malloc_defaults():  # as around an evaluation
    given_back = resident_freed - resident()
    inside = libc.mallinfo2()
    block = torch.ones(32 << 20)
    mapped_inside = libc.mallinfo2().hblkhd - inside.hblkhd
    del block
after = libc.mallinfo2()
block = torch.ones(32 << 20)
print(json.dumps({"mapped_while_held": held.hblkhd - before.hblkhd,
                  "heap_kept_after_free": freed.arena - before.arena,
                  "resident_given_back": given_back, "mapped_in_defaults": mapped_inside,
                  "mapped_after_defaults": libc.mallinfo2().hblkhd - after.hblkhd}))
"""


def _where_a_block_lives(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _WHERE_A_BLOCK_LIVES, mode], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux's")
def test_kept_memory_serves_a_large_tensor_from_the_heap_and_keeps_it_after_free():
    block = 128 << 20
    default = _where_a_block_lives("default")
    kept = _where_a_block_lives("keep")
    assert default["mapped_while_held"] >= block  # by default its own mapping, unmapped on free
    assert default["heap_kept_after_free"] < block
    assert kept["mapped_while_held"] < block  # kept: from the heap, and the heap keeps it after free
    assert kept["heap_kept_after_free"] >= block
    # Around an evaluation: the kept pages go back, large blocks are mapped again, then kept again after.
    assert kept["resident_given_back"] >= block * 3 // 4
    assert kept["mapped_in_defaults"] >= block and kept["mapped_after_defaults"] < block
    assert abs(default["resident_given_back"]) < block // 4, "nothing kept, nothing to give back"
    assert default["mapped_in_defaults"] >= block and default["mapped_after_defaults"] >= block, "and no change"


def test_heap_decision(monkeypatch):
    from trainer import heap

    for name in [name for name in os.environ if name.startswith("MALLOC_") or name == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(name)
    assert heap.keep_freed_memory("cuda").value == "default"
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    env = heap.keep_freed_memory("cpu")
    assert env.value == "default" and "MALLOC_ARENA_MAX" in env.reason
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    assert "not glibc" in heap.keep_freed_memory("cpu").reason

    kept = []
    monkeypatch.setattr(heap, "_glibc", lambda: "libc")
    monkeypatch.setattr(heap, "keep", kept.append)
    monkeypatch.setattr(heap, "fill_seconds", lambda: (0.0012, 0.0010))  # faults nearly free: left alone
    cheap = heap.keep_freed_memory("cpu")
    assert cheap.value == "default" and "1.2 ms" in cheap.reason and not kept
    monkeypatch.setattr(heap, "fill_seconds", lambda: (0.0150, 0.0010))
    costly = heap.keep_freed_memory("cpu")
    assert costly.value == "kept" and "15.0 ms" in costly.reason and kept == ["libc"]
