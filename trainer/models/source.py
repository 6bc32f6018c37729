"""A base model as a path or hub id that transformers' from_pretrained accepts, building what is built
on first use (a builtin's weights, a GGUF base's dequantized folder). Whether it is there at all is
inputs/models/source.py's `check_available`, which the host asks before a job exists.
"""

from __future__ import annotations

from pathlib import Path

from contract.strategy import BaseModelSpec
from inputs.models import builtin as registry
from inputs.models import gguf
from inputs.models.source import _is_local
from trainer.models import builtin, gguf_base


def resolve(spec: BaseModelSpec) -> str:
    """A path or hub id that transformers' from_pretrained accepts."""
    if registry.is_builtin(spec.huggingface_id):
        return str(builtin.builtin_path(spec.huggingface_id))
    if gguf.is_gguf_source(spec.huggingface_id):
        return str(gguf_base.dequantized_folder(spec.huggingface_id))
    if _is_local(spec.huggingface_id):
        return str(Path(spec.huggingface_id).expanduser())
    return spec.huggingface_id
