"""Any Hugging Face causal-LM folder (a merged export, a downloaded model) as an input to `export`,
`generate` and `evaluate`, not only llamafarm's own final/ folders.

A folder without strategy.yaml gets the strategy a full fine-tune of itself would have had: the
folder is its own base model, its own chat template is used (template auto), and every other
setting (export quantization, Ollama sampling, ...) comes from the schema's defaults.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from contract.errors import UserError
from contract.job_folder import STRATEGY_FILE
from contract.strategy import Strategy, parse_strategy


def is_causal_lm_folder(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForCausalLM") for a in config.get("architectures") or [])


def folder_strategy(folder: Path) -> tuple[Strategy, str]:
    """(strategy, its YAML text) for a llamafarm model folder or a plain causal-LM folder."""
    if (folder / STRATEGY_FILE).exists():
        text = (folder / STRATEGY_FILE).read_text()
        return parse_strategy(str(folder / STRATEGY_FILE), yaml.safe_load(text)), text
    if not is_causal_lm_folder(folder):
        raise UserError(
            f"{folder} is neither a llamafarm model folder (no {STRATEGY_FILE}) nor a Hugging Face causal-LM folder "
            "(no config.json naming a ...ForCausalLM architecture); give a job id, its final/ folder or a model folder"
        )
    raw = {
        "description": f"the model folder {folder} as it is (no llamafarm strategy.yaml)",
        "fine_tuner": {"config": {"base_model": {"name": folder.name, "huggingface_id": str(folder)},
                                  "method": {"type": "full"}}},
    }
    return parse_strategy(str(folder), raw), yaml.safe_dump(raw, sort_keys=False)
