"""A LoRA job output made a plain base model: the adapter folded into its own base weights, saved once
in the cache folder inputs/models/job_output.py names (`python -m trainer merge-base FINAL TARGET`).
"""

from __future__ import annotations

from pathlib import Path

from inputs.models.cache import build_once


def merge(final: Path, target: Path) -> None:
    """The adapter folded into its base weights (fp32), with the artifact's tokenizer, via a temp folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from contract.job_folder import read_job_strategy
    from trainer.generate import load_base, quiet_libraries

    quiet_libraries()
    strategy, _ = read_job_strategy(final)
    model = PeftModel.from_pretrained(load_base(strategy.cfg), final).merge_and_unload()

    def save(tmp: Path) -> None:
        model.to(torch.float32).save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(final).save_pretrained(tmp)

    build_once(target, "config.json", save)
