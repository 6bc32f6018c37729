"""The weights an export writes: a full model folder, or a base model with a LoRA adapter merged in.

Mixture-of-experts checkpoints keep one 2-D tensor per expert (transformers 5 fuses them into 3-D
parameters in memory and splits them again on save); GGUF keeps one 3-D tensor per projection and
layer (E, rows, cols). Those are presented here as one stacked tensor, named as the projection
without the expert index (model.layers.0.mlp.experts.gate_proj.weight), the name gguf-py maps to
ffn_gate_exps; each expert is read (and merged) in turn.

The merge happens per tensor as it is read (W + scale * B @ A, in float32), so a LoRA job exports
without ever holding a merged model in memory and without torch. Adapters that change more than
the target weights (DoRA, modules_to_save, trained embeddings) are refused by name: merging them
this way would silently drop what they trained.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract.errors import UserError
from trainer.export.safetensors_io import SafetensorsFolder

ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PEFT saves module names under this
_EXPERT = re.compile(r"^(?P<experts>.+\.experts)\.(?P<index>\d+)\.(?P<proj>\w+)\.weight$")


@dataclass(frozen=True)
class LoraPair:
    a: str  # adapter tensor names
    b: str


def stacked_experts(names: list[str]) -> dict[str, list[str]]:
    """Per-expert tensors grouped by projection: stacked name -> the experts' tensor names, in expert order."""
    found: dict[str, dict[int, str]] = {}
    for name in names:
        m = _EXPERT.match(name)
        if m:
            found.setdefault(f"{m['experts']}.{m['proj']}.weight", {})[int(m["index"])] = name
    for stacked, members in found.items():
        if sorted(members) != list(range(len(members))):
            raise UserError(f"experts of {stacked} are numbered {sorted(members)}, not 0..{len(members) - 1}; "
                            "the checkpoint is incomplete")
    return {stacked: [members[i] for i in range(len(members))] for stacked, members in found.items()}


def read_adapter_config(folder: Path) -> dict:
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    unsupported = [k for k in ("use_dora", "modules_to_save", "fan_in_fan_out") if cfg.get(k)]
    if unsupported:
        raise UserError(f"{folder}: adapter uses {', '.join(unsupported)}, which export cannot merge")
    return cfg


def lora_scale(cfg: dict) -> float:
    r = cfg["r"]
    return cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)


class ModelWeights:
    """Tensor names, shapes and float32 values of the model to export (merged when an adapter is given)."""

    def __init__(self, model_dir: Path, adapter_dir: Path | None = None):
        config_path = model_dir / "config.json"
        if not config_path.exists():
            raise UserError(f"{model_dir} has no config.json; it is not a Hugging Face model folder")
        self.config = json.loads(config_path.read_text())
        self.base = SafetensorsFolder(model_dir, "model*.safetensors")
        self.stacks = stacked_experts(self.base.names())
        self._stacked_as = {m: stacked for stacked, members in self.stacks.items() for m in members}
        self.pairs: dict[str, LoraPair] = {}
        self.scale = 1.0
        self.adapter = None
        if adapter_dir is not None:
            cfg = read_adapter_config(adapter_dir)
            self.scale = lora_scale(cfg)
            self.adapter = SafetensorsFolder(adapter_dir, "adapter_model*.safetensors")
            for name in self.adapter.names():
                if ".lora_A." not in name:
                    if ".lora_B." not in name:
                        raise UserError(f"{adapter_dir}: adapter tensor {name} is not a LoRA A/B pair; cannot merge")
                    continue
                module = name.removeprefix(PEFT_PREFIX).split(".lora_A.")[0]
                target = f"{module}.weight"
                if target not in self.base:
                    raise UserError(f"{adapter_dir}: adapter targets {module}, which the base model does not have")
                self.pairs[target] = LoraPair(name, name.replace(".lora_A.", ".lora_B."))

    def names(self) -> list[str]:
        """The base's tensor names, each projection's experts as one stacked name where the first expert was."""
        out = []
        for name in self.base.names():
            stacked = self._stacked_as.get(name)
            if stacked is None:
                out.append(name)
            elif self.stacks[stacked][0] == name:
                out.append(stacked)
        return out

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.stacks:
            return (len(self.stacks[name]), *self.base.shape(self.stacks[name][0]))
        return self.base.shape(name)

    def float32(self, name: str) -> np.ndarray:
        if name in self.stacks:
            return np.stack([self.float32(member) for member in self.stacks[name]])
        w = self.base.float32(name)
        pair = self.pairs.get(name)
        if pair is not None:
            w = w + self.scale * (self.adapter.float32(pair.b) @ self.adapter.float32(pair.a))
        return w
