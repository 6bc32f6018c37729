"""A PEFT LoRA adapter as a GGUF LoRA (llama.cpp's --lora, Ollama's ADAPTER), without torch.

llama.cpp applies `scale * B @ A` with scale = adapter.lora.alpha / rank, so alpha is written as the
value that gives PEFT's scale (for rsLoRA that differs from the configured alpha). Tensor names are
the base tensor's GGUF name plus .lora_a / .lora_b, and the llama q/k re-order of the base weights
applies to the rows of lora_b (A acts on the input side, which is not re-ordered).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from contract.errors import UserError
from trainer.export.gguf_model import Shape
from trainer.export.safetensors_io import SafetensorsFolder
from trainer.export.weights import PEFT_PREFIX, lora_scale, read_adapter_config


def convert_adapter(adapter_dir: Path, base_config: dict, out: Path, name: str) -> dict:
    cfg = read_adapter_config(adapter_dir)
    shape = Shape.from_config(base_config)
    tensors = SafetensorsFolder(adapter_dir, "adapter_model*.safetensors")
    writer = gguf.GGUFWriter(out, shape.arch)
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    rank = cfg["r"]
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora_scale(cfg) * rank))
    count = 0
    for a_name in tensors.names():
        if ".lora_A." not in a_name:
            continue
        module = a_name.removeprefix(PEFT_PREFIX).split(".lora_A.")[0]
        target = shape.gguf_name(f"{module}.weight")
        if target is None or target.startswith(("token_embd", "output")):
            raise UserError(f"{adapter_dir}: LoRA on {module} cannot be written as a GGUF adapter")
        a = tensors.float32(a_name)
        b = shape.transform(f"{module}.weight", tensors.float32(a_name.replace(".lora_A.", ".lora_B.")))
        base = target.removesuffix(".weight")
        writer.add_tensor(f"{base}.weight.lora_a", np.ascontiguousarray(a))
        writer.add_tensor(f"{base}.weight.lora_b", np.ascontiguousarray(b))
        count += 1
    if not count:
        raise UserError(f"{adapter_dir}: the adapter holds no LoRA tensors")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"lora_pairs": count, "rank": rank, "alpha_written": float(lora_scale(cfg) * rank),
            "target_modules": cfg.get("target_modules")}
