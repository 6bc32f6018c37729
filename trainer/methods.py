"""Fine-tuning methods: small builders chosen by `method.type`, all feeding the same training loop.

Each method says how to load the base model (e.g. 4-bit for QLoRA) and how to make it trainable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from contract.errors import UserError
from contract.strategy import MethodSpec
from contract.decisions import Decision


@dataclass(frozen=True)
class Method:
    load_kwargs: Callable[[MethodSpec, object], dict]
    make_trainable: Callable[..., object]
    """(model, method, adapter_from) -> trainable model; adapter_from is a checkpoint to resume."""


def linear_layers(model) -> list[str]:
    """Names (last part) of the model's linear layers, the output layer excluded; fused ones
    (Phi-3's qkv_proj, gate_up_proj) are single layers."""
    import torch

    output = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                   if isinstance(mod, torch.nn.Linear) and mod is not output})


def experts_note(model) -> str:
    """Why a mixture of experts' experts and router are no LoRA targets ("" for a dense model)."""
    experts = sorted({name.rsplit(".", 1)[-1] for name, p in model.named_parameters() if p.dim() == 3})
    if not experts:
        return ""
    return (f"; the experts ({', '.join(experts)}: 3-D parameters, not linear layers) and the router are left out: "
            "export merges LoRA into linear layers only, and a tuned router changes which experts run")


def resolve_targets(model, method: MethodSpec) -> Decision:
    """The LoRA target modules: the strategy's list, checked against the model, or auto's every linear layer."""
    linear = linear_layers(model)
    if method.target_modules == "auto":
        return Decision(linear, f"auto: every linear layer of {type(model).__name__} but the output layer"
                                + experts_note(model))
    missing = [t for t in method.target_modules if t not in linear]
    if missing:
        raise UserError(
            f"method.target_modules {missing} do not exist in this model ({type(model).__name__}); "
            f"its linear layers are: {', '.join(linear)} (or use target_modules: auto){experts_note(model)}"
        )
    return Decision(list(method.target_modules), "set in the strategy")


def _lora(model, method: MethodSpec, adapter_from=None):
    from peft import LoraConfig, PeftModel, get_peft_model

    if method.target_modules == "auto":  # the entrypoint passes them resolved; other callers may not
        method = method.model_copy(update={"target_modules": resolve_targets(model, method).value})
    if adapter_from:
        return PeftModel.from_pretrained(model, adapter_from, is_trainable=True)
    config = LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=list(method.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _qlora(model, method: MethodSpec, adapter_from=None):
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return _lora(model, method, adapter_from)


def _qlora_load(method: MethodSpec, compute_dtype) -> dict:
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    }


def _full(model, method: MethodSpec, adapter_from=None):
    # A resumed full fine-tune was loaded from the checkpoint's weights already.
    for p in model.parameters():
        p.requires_grad_(True)
    return model


METHODS: dict[str, Method] = {
    "lora": Method(lambda m, d: {}, _lora),
    "qlora": Method(_qlora_load, _qlora),
    "full": Method(lambda m, d: {}, _full),
}
