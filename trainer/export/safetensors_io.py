"""Reading safetensors weights one tensor at a time, without torch.

Export streams weights: each tensor is read from a memory map, converted and written before the next
is touched, so peak memory stays near one tensor. numpy has no bfloat16, which is why this reads the
(simple, documented) safetensors layout itself: bf16 values are widened to float32 by a bit shift.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract.errors import UserError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


class SafetensorsFolder:
    """Every tensor of a model folder (model.safetensors or sharded model-0000x-of-0000y.safetensors)."""

    def __init__(self, folder: Path, pattern: str = "*.safetensors"):
        files = sorted(folder.glob(pattern))
        if not files:
            raise UserError(
                f"{folder} holds no {pattern} weights; export reads safetensors only "
                "(convert .bin weights with `save_pretrained(safe_serialization=True)`)"
            )
        self.entries: dict[str, TensorEntry] = {}
        self._maps: dict[Path, np.memmap] = {}
        for file in files:
            with open(file, "rb") as fh:
                (header_len,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(header_len))
            base = 8 + header_len
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in _DTYPES:
                    raise UserError(f"{file}: tensor {name} has dtype {info['dtype']}, which export does not read")
                start, end = info["data_offsets"]
                self.entries[name] = TensorEntry(file, info["dtype"], tuple(info["shape"]), base + start, base + end)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def float32(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array (the memory map is only read)."""
        e = self.entries[name]
        if e.file not in self._maps:
            self._maps[e.file] = np.memmap(e.file, dtype=np.uint8, mode="r")
        raw = self._maps[e.file][e.start : e.end].view(_DTYPES[e.dtype])
        if e.dtype == "BF16":
            out = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            out = raw.astype(np.float32)
        return out.reshape(e.shape)
