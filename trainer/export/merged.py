"""Merged Hugging Face weights: the LoRA folded into the base, saved as safetensors with the tokenizer
(and its chat template) and the generation config, in the precision asked for, then reloaded and
compared with the model it came from."""

from __future__ import annotations

import copy
from pathlib import Path

from contract.errors import UserError

DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
# Max |logit diff| of the reloaded weights against the fp32 model they came from, relative to the
# largest |logit| (as in verify.py): only the weights' rounding, no activation rounding, separates them.
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 1.5e-2}


def write_merged(model, tokenizer, out: Path, precision: str, encoder, prompts: list[str]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, DTYPES[precision])
    merged = copy.deepcopy(model)
    if hasattr(merged, "merge_and_unload"):
        merged = merged.merge_and_unload()
    merged.to(dtype).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if merged.generation_config is not None:
        merged.generation_config.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(model.device).eval()
    worst, scale = 0.0, 1.0
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([encoder.prompt_ids([{"role": "user", "content": prompt}])], device=model.device)
            ref = model(input_ids=ids).logits
            worst = max(worst, float((ref - reloaded(input_ids=ids).logits).abs().max()))
            scale = max(scale, float(ref.abs().max()))
    relative = worst / scale
    if relative > TOLERANCE[precision]:
        raise UserError(f"merged {precision} weights differ from the trained model by {worst:.2e} in the logits, "
                        f"{relative:.1e} of the largest logit (tolerance {TOLERANCE[precision]:.0e})")
    print(f"merged: {precision} safetensors; reloaded logits within {worst:.2e} ({relative:.1e} of the largest "
          "logit) of the trained model", flush=True)
    return {"precision": precision, "max_abs_logit_diff": float(f"{worst:.3g}"),
            "relative_logit_diff": float(f"{relative:.3g}"), "tolerance": TOLERANCE[precision]}
