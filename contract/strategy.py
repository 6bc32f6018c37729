"""The strategy schema: every training setting, typed, with its default.

This module is the only place a strategy default lives. It imports no torch, so the host CLI, the
trainer and the tests all validate the same way. Unknown keys and wrong types are rejected; numbers
written as strings ("3e-4") are coerced; every error is reported at once with its path.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    # extra="forbid": a misspelt key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_default=True)


class BaseModelSpec(_Strict):
    name: str = Field(description="Short display name of the base model, e.g. llama3.2-3b.")
    huggingface_id: str = Field(
        description="Hub id, local folder, or builtin:<name> (builtin:tiny-llama-spm, builtin:tiny-llama-bpe).",
        min_length=1,
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit) to pin.")
    trust_remote_code: bool = Field(
        default=False, description="Run model code shipped with a hub repo. Off unless you trust the repo."
    )


class MethodSpec(_Strict):
    type: Literal["lora", "qlora", "full"] = Field(default="lora", description="lora, qlora (4-bit base, CUDA) or full.")
    r: int = Field(default=8, gt=0, description="LoRA rank; higher trains more parameters.")
    alpha: float = Field(default=16.0, gt=0, description="LoRA scaling numerator; the update is scaled by alpha/r.")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], min_length=1, description="Module names that get LoRA adapters."
    )
    fallback_to_lora: bool = Field(
        default=False, description="qlora only: train plain LoRA where CUDA or bitsandbytes is missing, instead of failing."
    )

    @model_validator(mode="after")
    def _no_ignored_keys(self) -> "MethodSpec":
        errors = []
        if self.type == "full":
            lora_keys = {"r", "alpha", "dropout", "target_modules"} & self.model_fields_set
            if lora_keys:
                errors.append(f"{', '.join(sorted(lora_keys))} only apply to lora and qlora, not to method type full")
        if self.type != "qlora" and "fallback_to_lora" in self.model_fields_set:
            errors.append("fallback_to_lora only applies to method type qlora")
        if errors:
            raise ValueError("; ".join(errors))
        return self


class TrainingArgs(_Strict):
    num_train_epochs: float = Field(default=1.0, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(
        default=None, gt=0, description="Stop after this many optimizer steps (overrides num_train_epochs)."
    )
    per_device_train_batch_size: int = Field(default=1, gt=0, description="Sequences per forward pass.")
    gradient_accumulation_steps: int = Field(default=1, gt=0, description="Forward passes per optimizer step.")
    learning_rate: float = Field(default=2e-4, gt=0, le=1.0, description="Peak learning rate of AdamW.")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        default="linear", description="Learning-rate schedule after warm-up."
    )
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="Gradient clipping norm; null turns it off.")
    max_seq_length: int = Field(default=512, gt=8, description="Tokens per training row, prompt included.")
    seed: int = Field(default=42, ge=0, description="Seed for initialisation, dropout and data order.")
    logging_steps: int = Field(default=1, gt=0, description="Write a metrics line every N optimizer steps.")
    save_steps: int | None = Field(
        default=None, gt=0, description="Checkpoint every N optimizer steps; null saves only the final weights."
    )
    save_total_limit: int = Field(default=2, gt=0, description="Checkpoints kept; older ones are deleted.")
    eval_steps: int | None = Field(
        default=None, gt=0, description="Eval loss every N steps; null: at the end of every epoch. Needs eval data."
    )
    save_best: bool = Field(
        default=False, description="Keep the checkpoint with the lowest eval loss as best/. Needs eval data."
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in backward: less memory, about 20-30% slower."
    )
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        default="auto", description="Compute precision; auto picks the best the device supports."
    )
    report_to: Literal["none", "tensorboard"] = Field(
        default="none", description="Also write TensorBoard event files into the job's tensorboard/ folder."
    )


class DatasetSpec(_Strict):
    format: Literal["auto", "alpaca", "chat", "sharegpt", "prompt_completion", "text"] = Field(
        default="auto", description="Row format; auto detects it from the rows' keys."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Your column names for the format's fields, e.g. {instruction: question, output: answer}.",
    )
    template: str = Field(
        default="auto",
        description="Chat template: auto (the model's own, else alpaca) or a name from `chat_templates`.",
    )
    train_on_inputs: bool = Field(default=False, description="Put system and user tokens in the loss too.")
    truncation: Literal["truncate", "drop"] = Field(
        default="truncate", description="What to do with rows longer than max_seq_length."
    )
    packing: Literal["auto"] | bool = Field(
        default="auto",
        description="Pack several rows into each sequence (no attention across rows); auto: on where supported.",
    )
    eval_fraction: float = Field(
        default=0.0, ge=0.0, le=0.5, description="Share of the rows held out for eval loss (seeded split)."
    )
    eval_file: str | None = Field(default=None, description="A separate eval dataset; replaces eval_fraction.")

    @model_validator(mode="after")
    def _one_eval_source(self) -> "DatasetSpec":
        if self.eval_file and self.eval_fraction:
            raise ValueError("set eval_fraction or eval_file, not both")
        return self

    @property
    def has_eval(self) -> bool:
        return bool(self.eval_file or self.eval_fraction)


class FineTunerConfig(_Strict):
    base_model: BaseModelSpec
    method: MethodSpec = Field(default_factory=MethodSpec)
    training_args: TrainingArgs = Field(default_factory=TrainingArgs)
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    device: Literal["auto", "cuda", "mps", "cpu"] = Field(
        default="auto", description="Where to train; auto picks cuda, then mps, then cpu."
    )
    fallback_device: Literal["cpu"] | None = Field(
        default=None, description="Device to use when `device` is not available; null makes that an error."
    )
    runner: str = Field(default="auto", description="How the job is started: auto or a runner name.")

    @model_validator(mode="after")
    def _eval_settings_need_eval_data(self) -> "FineTunerConfig":
        if not self.dataset.has_eval:
            used = [k for k in ("eval_steps", "save_best") if k in self.training_args.model_fields_set
                    and getattr(self.training_args, k)]
            if used:
                raise ValueError(
                    f"training_args.{', '.join(used)} need eval data: set dataset.eval_fraction or dataset.eval_file"
                )
        return self


class FineTuner(_Strict):
    type: str = Field(default="pytorch", description="Training backend: pytorch (built in) or llamafactory.")
    config: FineTunerConfig


class Strategy(_Strict):
    description: str = Field(default="", description="One line shown by `strategies list`.")
    fine_tuner: FineTuner

    @property
    def cfg(self) -> FineTunerConfig:
        return self.fine_tuner.config


def _format_loc(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def parse_strategy(source: str, data: object) -> Strategy:
    """Validate raw YAML data; raise StrategyError listing every problem with its path."""
    from pydantic import ValidationError

    from contract.errors import StrategyError

    try:
        return Strategy.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling; `llamafarm finetune strategies show` lists valid keys)"
            elif err["type"] == "missing":
                msg = "required key is missing"
            problems.append(f"{_format_loc(err['loc'])}: {msg}")
        raise StrategyError(source, problems) from None


def resolved_dict(strategy: Strategy) -> dict:
    """The strategy with every default filled in, as written into job folders and artifacts.

    Keys that do not apply to the chosen method are left out, so the dict validates again.
    """
    data = strategy.model_dump(mode="json")
    method = data["fine_tuner"]["config"]["method"]
    if method["type"] != "qlora":
        method.pop("fallback_to_lora")
    if method["type"] == "full":
        for key in ("r", "alpha", "dropout", "target_modules"):
            method.pop(key)
    return data
