"""The strategy schema: every training setting, typed, with its default.

This module is the only place a strategy default lives. It imports no torch, so the host CLI, the
trainer and the tests all validate the same way. Unknown keys and wrong types are rejected; numbers
written as strings ("3e-4") are coerced; every error is reported at once with its path.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from contract.decisions import PRECISIONS
from contract.export_options import FORMATS, MERGED_PRECISIONS, QUANTIZATIONS, VERIFY_PROMPTS_FROM_DATA

PRECISION_SETTINGS = ("auto", *PRECISIONS)


# Upper bounds on counts: torch and numpy index with 64-bit (seeds: 32-bit) integers, and a value past
# these is a typo, not a plan. Reported as a schema error rather than an OverflowError mid-run.
_MAX_COUNT = 2**31 - 1
_MAX_EPOCHS = 1e6


class _Strict(BaseModel):
    # extra="forbid": a misspelt key is an error, never silently ignored. allow_inf_nan=False: 1e400
    # and .inf are not numbers a run can use.
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value, info: ValidationInfo):
        # Pydantic's lax mode reads true as 1 and 1.0; `learning_rate: true` is a mistake, never a number.
        if isinstance(value, bool) and not _accepts_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"{str(value).lower()} is a boolean; this key takes a {_kind(cls.model_fields[info.field_name].annotation)}")
        return value


def _kind(annotation) -> str:
    from typing import Literal, get_args, get_origin

    def one(a) -> str:
        if isinstance(a, type) and issubclass(a, BaseModel):
            return "section (a mapping of keys)"
        if get_origin(a) is Literal:
            return "name"
        return {int: "number", float: "number", str: "text", list: "list", dict: "mapping"}.get(get_origin(a) or a, "value")

    parts = get_args(annotation) if get_origin(annotation) not in (None, list, dict, Literal) else (annotation,)
    return " or ".join(sorted({one(a) for a in parts if a is not type(None)}))


def _accepts_bool(annotation) -> bool:
    from typing import get_args

    return annotation is bool or bool in get_args(annotation) or any(
        _accepts_bool(arg) for arg in get_args(annotation) if get_args(arg))


class BaseModelSpec(_Strict):
    name: str | None = Field(
        default=None, description="Short display name of the base model, e.g. llama3.2-3b; null: from huggingface_id."
    )
    huggingface_id: str = Field(
        description="Hub id, local folder, builtin:<name> (builtin:tiny-llama-spm, builtin:tiny-llama-bpe, "
        "builtin:smollm2-135m-instruct), a local .gguf file or ollama:NAME[:TAG] (dequantized and checked against "
        "llama.cpp once), or a previous job's output: job:<job_id> or its folder (a LoRA output is merged into its base).",
        min_length=1,
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit) to pin.")
    trust_remote_code: bool = Field(
        default=False, description="Run model code shipped with a hub repo. Off unless you trust the repo."
    )

    @model_validator(mode="after")
    def _default_name(self) -> "BaseModelSpec":
        if not self.name:
            # "Org/Model-1B" -> "Model-1B", "builtin:tiny" -> "tiny", "./models/mine/" -> "mine"
            self.name = re.split(r"[/:\\]", self.huggingface_id.rstrip("/\\"))[-1] or self.huggingface_id
        return self


# Dataset formats that hold preference data (trainer/data/preference.py reads them).
PREFERENCE_FORMATS = ("preference", "sharegpt_preference", "kto")

# Method keys that only mean something for some stages (the rest are refused, and left out of resolved strategies).
PREFERENCE_KEYS = {
    "beta": ("dpo", "orpo", "kto"),
    "dpo_loss": ("dpo",),
    "kto_desirable_weight": ("kto",),
    "kto_undesirable_weight": ("kto",),
}


class MethodSpec(_Strict):
    type: Literal["lora", "qlora", "full"] = Field(default="lora", description="lora, qlora (4-bit base, CUDA) or full.")
    r: int = Field(default=8, gt=0, le=_MAX_COUNT, description="LoRA rank; higher trains more parameters.")
    alpha: float = Field(default=16.0, gt=0, description="LoRA scaling numerator; the update is scaled by alpha/r.")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["auto"] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], min_length=1,
        description="Module names that get LoRA adapters, or auto: every linear layer of the model but the output layer.",
    )
    fallback_to_lora: bool = Field(
        default=False, description="qlora only: train plain LoRA where CUDA or bitsandbytes is missing, instead of failing."
    )
    stage: Literal["sft", "dpo", "orpo", "kto"] = Field(
        default="sft",
        description="Objective: sft (next-token loss on answers), or preference tuning on chosen/rejected "
        "data: dpo, orpo (no reference model) or kto (single answers labelled good or bad).",
    )
    beta: float = Field(
        default=0.1, gt=0, description="dpo/kto: strength of the pull toward the reference model; "
        "orpo: weight of the odds-ratio term beside the answer loss."
    )
    dpo_loss: Literal["sigmoid", "ipo"] = Field(
        default="sigmoid", description="dpo only: sigmoid (the DPO paper) or ipo (squared, length-averaged)."
    )
    kto_desirable_weight: float = Field(default=1.0, gt=0, description="kto only: loss weight of answers labelled good.")
    kto_undesirable_weight: float = Field(default=1.0, gt=0, description="kto only: loss weight of answers labelled bad.")

    @model_validator(mode="after")
    def _no_ignored_keys(self) -> "MethodSpec":
        errors = []
        for key, stages in PREFERENCE_KEYS.items():
            if key in self.model_fields_set and self.stage not in stages:
                errors.append(f"{key} only applies to stage {' or '.join(stages)}, not to stage {self.stage}")
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
    num_train_epochs: float = Field(default=1.0, gt=0, le=_MAX_EPOCHS, description="Passes over the training data.")
    max_steps: int | None = Field(
        default=None, gt=0, le=_MAX_COUNT, description="Stop after this many optimizer steps (overrides num_train_epochs)."
    )
    per_device_train_batch_size: int = Field(default=1, gt=0, le=_MAX_COUNT, description="Sequences per forward pass.")
    gradient_accumulation_steps: int = Field(default=1, gt=0, le=_MAX_COUNT, description="Forward passes per optimizer step.")
    learning_rate: float = Field(default=2e-4, gt=0, le=1.0, description="Peak learning rate of AdamW.")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        default="linear", description="Learning-rate schedule after warm-up."
    )
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay.")
    adam_beta1: float = Field(default=0.9, ge=0.0, lt=1.0, description="AdamW's decay rate of the gradient's mean.")
    adam_beta2: float = Field(default=0.999, ge=0.0, lt=1.0,
                              description="AdamW's decay rate of the squared gradient's mean.")
    adam_epsilon: float = Field(default=1e-8, gt=0.0, le=1.0,
                                description="AdamW's epsilon, added to the root of the squared gradient's mean.")
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="Gradient clipping norm; null turns it off.")
    max_seq_length: int = Field(default=512, gt=8, le=_MAX_COUNT, description="Tokens per training row, prompt included.")
    seed: int = Field(default=42, ge=0, le=2**32 - 1, description="Seed for initialisation, dropout and data order.")
    logging_steps: int = Field(default=1, gt=0, le=_MAX_COUNT, description="Write a metrics line every N optimizer steps.")
    save_steps: int | None = Field(
        default=None, gt=0, le=_MAX_COUNT, description="Checkpoint every N optimizer steps; null saves only the final weights."
    )
    save_total_limit: int = Field(default=2, gt=0, le=_MAX_COUNT, description="Checkpoints kept; older ones are deleted.")
    eval_steps: int | None = Field(
        default=None, gt=0, le=_MAX_COUNT, description="Eval loss every N steps; null: at the end of every epoch. Needs eval data."
    )
    save_best: bool = Field(
        default=False, description="Keep the checkpoint with the lowest eval loss as best/. Needs eval data."
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in backward: less memory, about 20-30% slower."
    )
    precision: Literal[PRECISION_SETTINGS] = Field(
        default="auto", description="Compute precision; auto picks the best the device supports."
    )
    torch_compile: Literal["auto"] | bool = Field(
        default="auto",
        description="Compile the decoder layers with torch.compile (faster steps after a one-time compile); "
        "auto: on CPU when the gain measured on this machine repays the compile within the estimated training time.",
    )
    report_to: Literal["none", "tensorboard"] = Field(
        default="none", description="Also write TensorBoard event files into the job's tensorboard/ folder."
    )


# The fields of every row format (inputs/data/records.py), the names dataset.columns may map to.
DATASET_FIELDS = ("instruction", "input", "output", "system", "prompt", "completion", "messages", "conversations",
                  "tools", "text")
LLAMAFACTORY_COLUMNS = {"query": "input", "response": "output", "history": "earlier turns (write sharegpt rows instead)"}


class DatasetSpec(_Strict):
    format: Literal["auto", "alpaca", "chat", "sharegpt", "prompt_completion", "text",
                    "preference", "sharegpt_preference", "kto"] = Field(
        default="auto", description="Row format; auto detects it from the rows' keys. preference, "
        "sharegpt_preference and kto are for method.stage dpo, orpo and kto (docs/PREFERENCE.md)."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Your column names for the format's fields, e.g. {instruction: question, output: answer}.",
    )
    replace: dict[str, str] = Field(
        default_factory=dict,
        description="Values for {{name}} placeholders in the rows, e.g. {name: MedBot, author: Acme}; "
        "placeholders left unfilled are counted in a warning.",
    )
    text_mode: Literal["blocks", "truncate"] = Field(
        default="blocks",
        description="Plain-text rows (format text): blocks joins the documents, each ending in EOS, and cuts "
        "full max_seq_length blocks so every token trains (pretraining); truncate cuts each row at max_seq_length.",
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

    @model_validator(mode="after")
    def _known_columns(self) -> "DatasetSpec":
        unknown = [k for k in self.columns if k not in DATASET_FIELDS]
        if not unknown:
            return self
        hints = [f"{k} is LlamaFactory's name for {LLAMAFACTORY_COLUMNS[k]}" for k in unknown if k in LLAMAFACTORY_COLUMNS]
        raise ValueError(
            f"columns: unknown field(s) {', '.join(unknown)}; valid: {', '.join(DATASET_FIELDS)}"
            + (f" ({'; '.join(hints)}; or give the whole entry as --dataset path/to/dataset_info.json:NAME)" if hints else "")
        )

    @property
    def has_eval(self) -> bool:
        return bool(self.eval_file or self.eval_fraction)


class OllamaSpec(_Strict):
    system: str | None = Field(default=None, description="SYSTEM prompt written into the Modelfile; null: none.")
    # Sampling: written into the Modelfile and used by `generate` and `evaluate` too, so an answer seen
    # here is one Ollama could give. The defaults are Ollama's own; greedy only with --greedy.
    temperature: float = Field(default=0.8, ge=0.0, description="Sampling temperature (Ollama's default 0.8).")
    top_p: float = Field(default=0.9, gt=0.0, le=1.0, description="Nucleus sampling (Ollama's default 0.9).")
    top_k: int = Field(default=40, gt=0, le=_MAX_COUNT, description="Top-k sampling (Ollama's default 40).")
    repeat_penalty: float = Field(
        default=1.1, gt=0.0, description="Penalty on tokens seen in the last repeat_last_n (Ollama's default 1.1)."
    )
    repeat_last_n: int = Field(default=64, gt=0, description="Tokens the repeat penalty looks back over (Ollama's 64).")
    seed: int | None = Field(default=None, ge=0, description="Sampling seed; null: a fresh one each time (as Ollama).")

    @field_validator("temperature", "top_p", "top_k", "repeat_penalty", mode="before")
    @classmethod
    def _null_is_ollamas_default(cls, value, info):
        # Strategies resolved before these had values say null, which meant Ollama's default then too.
        return cls.model_fields[info.field_name].default if value is None else value
    num_ctx: int | None = Field(
        default=None, gt=0, le=_MAX_COUNT, description="Context window; null: the training max_seq_length."
    )


class ExportSpec(_Strict):
    format: Literal[FORMATS] = Field(
        default="ollama", description="What `finetune export` writes when --format is not given."
    )
    quantization: Literal[QUANTIZATIONS] = Field(
        default="q8_0",
        description="GGUF weight type (K-quants need llama-cpp-python); merged takes f32, f16 or bf16.",
    )
    merged_precision: Literal[MERGED_PRECISIONS] = Field(
        default="f16", description="Precision of merged Hugging Face weights (format merged)."
    )
    verify_prompts: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Prompts on which every GGUF is compared with the PyTorch model; null: the first "
        f"{VERIFY_PROMPTS_FROM_DATA} user prompts of the job's training data (else a few general prompts).",
    )
    ollama: OllamaSpec = Field(default_factory=OllamaSpec)


class ContainerSettings(_Strict):
    """How the container runner starts the job's container (other runners ignore these)."""

    image: str | None = Field(
        default=None, description="Image to run; null: llamafarm-cuda or llamafarm-cpu at this version, by device."
    )
    gpus: Literal["all"] | list[int | str] = Field(
        default="all", description="GPUs a cuda job gets: all, or a list of indexes or UUIDs."
    )
    ipc: Literal["private", "host"] = Field(
        default="private", description="IPC namespace; host shares the host's /dev/shm (NVIDIA's advice for multi-GPU)."
    )
    shm_size: str = Field(
        default="2g", pattern=r"^[0-9]+[bkmg]?$", description="Size of /dev/shm with ipc private (data loaders use it)."
    )
    ulimits: dict[str, int | str] = Field(
        default_factory=lambda: {"nofile": "1024:4096", "nproc": "4096:4096"},
        description="Resource limits as soft:hard (or one value for both; -1 is unlimited), e.g. memlock: '-1'.",
    )
    pass_env: list[str] = Field(
        default_factory=lambda: ["HF_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT"],
        description="Host environment variables copied into the container, each only when it is set.",
    )

    @model_validator(mode="after")
    def _limits_parse(self) -> "ContainerSettings":
        limit = re.compile(r"(-1|[0-9]+)(:(-1|[0-9]+))?")
        bad = [f"{k}: {v!r}" for k, v in self.ulimits.items() if not limit.fullmatch(str(v))]
        if bad:
            raise ValueError(f"ulimits must be soft:hard numbers (-1 for unlimited): {', '.join(bad)}")
        if self.ipc == "host" and "shm_size" in self.model_fields_set:
            raise ValueError("shm_size only applies with ipc: private (ipc: host uses the host's /dev/shm)")
        return self


class DistributedSpec(_Strict):
    """Several training processes, on one machine or many, started by PyTorch's own launcher
    (torch.distributed.run, the module behind `torchrun`). docs/DISTRIBUTED.md has recipes."""

    mode: Literal["none", "ddp", "fsdp"] = Field(
        default="none",
        description="none: one process. ddp: every process holds the whole model and takes its share of each "
        "batch. fsdp: weights, gradients and optimizer state are sharded across processes (models too big for one device).",
    )
    nproc_per_node: int = Field(default=1, gt=0, le=_MAX_COUNT, description="Training processes on each machine: one per GPU.")
    nnodes: int = Field(default=1, gt=0, le=_MAX_COUNT, description="Machines taking part; each starts the same strategy.")
    node_rank: int = Field(
        default=0, ge=0, description="This machine's number, 0 to nnodes-1 (rdzv_backend static; c10d numbers nodes itself)."
    )
    rdzv_backend: Literal["c10d", "static"] = Field(
        default="c10d", description="How the machines meet: c10d (any order) or static (node_rank 0 hosts the meeting point)."
    )
    rdzv_endpoint: str | None = Field(
        default=None, description="host:port that every machine can reach; required when nnodes > 1."
    )
    rdzv_id: str = Field(
        default="llamafarm", pattern=r"^[A-Za-z0-9_.-]+$",
        description="Name of the rendezvous, the same on every machine of one job.",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        default="auto", description="Collective communication library; auto: nccl on CUDA, gloo on CPU."
    )

    @model_validator(mode="after")
    def _coherent(self) -> "DistributedSpec":
        chosen = self.model_fields_set - {"mode"}
        if self.mode == "none":
            if chosen:
                raise ValueError(f"{', '.join(sorted(chosen))} only appl{'ies' if len(chosen) == 1 else 'y'} "
                                 "when mode is ddp or fsdp")
            return self
        errors = []
        if self.nproc_per_node * self.nnodes == 1:
            errors.append(f"mode {self.mode} with one process in all: raise nproc_per_node or nnodes, or use mode none")
        multi_node_keys = {"node_rank", "rdzv_backend", "rdzv_endpoint", "rdzv_id"} & chosen
        if self.nnodes == 1 and multi_node_keys:
            errors.append(f"{', '.join(sorted(multi_node_keys))} only appl{'ies' if len(multi_node_keys) == 1 else 'y'} "
                          "when nnodes > 1 "
                          "(on one machine the launcher picks a free local port itself)")
        if self.nnodes > 1:
            if not self.rdzv_endpoint:
                errors.append("rdzv_endpoint (host:port that every machine can reach) is required when nnodes > 1")
            if self.node_rank >= self.nnodes:
                errors.append(f"node_rank {self.node_rank} must be below nnodes ({self.nnodes})")
            if self.rdzv_backend == "c10d" and "node_rank" in chosen:
                errors.append("node_rank only applies to rdzv_backend static; c10d numbers the machines itself")
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                errors.append(f"rdzv_endpoint {self.rdzv_endpoint!r} must be host:port, e.g. 10.0.0.1:29500")
        if errors:
            raise ValueError("; ".join(errors))
        return self


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
    runner: str = Field(
        default="auto", description="How the job is started: auto, local, container or native (see README, Runners)."
    )
    container: ContainerSettings = Field(default_factory=ContainerSettings)
    time_warning_hours: float = Field(
        default=8.0, gt=0, le=_MAX_EPOCHS,
        description="`estimate` and `start` warn when the estimated training time is longer than this many hours.",
    )
    export: ExportSpec = Field(default_factory=ExportSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)

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

    @model_validator(mode="after")
    def _stage_fits_the_data(self) -> "FineTunerConfig":
        stage, fmt = self.method.stage, self.dataset.format
        errors = []
        if stage == "sft" and fmt in PREFERENCE_FORMATS:
            errors.append(f"dataset.format {fmt} is preference data: set method.stage to dpo, orpo or kto")
        if stage != "sft":
            if fmt not in ("auto", *PREFERENCE_FORMATS):
                errors.append(f"method.stage {stage} needs preference data: dataset.format auto or one of "
                              f"{', '.join(PREFERENCE_FORMATS)}, not {fmt}")
            if stage != "kto" and fmt == "kto":
                errors.append(f"method.stage {stage} needs chosen/rejected pairs; dataset.format kto is for stage kto")
            if self.dataset.packing is True:
                errors.append(f"dataset.packing: true does not apply to method.stage {stage}: preference rows are "
                              "never packed, so a chosen and a rejected answer never share a sequence")
            if self.distributed.mode != "none":
                errors.append(f"method.stage {stage} runs in one process: set distributed.mode none")
            if self.dataset.train_on_inputs:
                errors.append(f"dataset.train_on_inputs does not apply to method.stage {stage}: "
                              "preference losses score the answers only")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @model_validator(mode="after")
    def _distributed_fits_the_rest(self) -> "FineTunerConfig":
        mode = self.distributed.mode
        if mode == "none":
            return self
        errors = []
        if self.device == "mps":
            errors.append("distributed training needs cuda or cpu: PyTorch has no collective backend for mps")
        if self.distributed.backend == "nccl" and self.device == "cpu":
            errors.append("distributed.backend nccl needs CUDA but device is cpu: use backend gloo or auto")
        if self.method.type == "qlora":
            errors.append(f"method qlora is not supported with distributed.mode {mode}: use method lora")
        if mode == "fsdp" and self.training_args.save_steps:
            errors.append("training_args.save_steps: checkpoints are not supported with distributed.mode fsdp "
                          "(its sharded optimizer state is not saved); use mode ddp or leave save_steps null")
        if errors:
            raise ValueError("; ".join(errors))
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
    for key, stages in PREFERENCE_KEYS.items():
        if method["stage"] not in stages:
            method.pop(key)
    if method["type"] == "full":
        for key in ("r", "alpha", "dropout", "target_modules"):
            method.pop(key)
    container = data["fine_tuner"]["config"]["container"]
    if container["ipc"] == "host":
        container.pop("shm_size")
    distributed = data["fine_tuner"]["config"]["distributed"]
    if distributed["mode"] == "none":
        data["fine_tuner"]["config"]["distributed"] = {"mode": "none"}
    elif distributed["nnodes"] == 1:
        for key in ("node_rank", "rdzv_backend", "rdzv_endpoint", "rdzv_id"):
            distributed.pop(key)
    elif distributed["rdzv_backend"] == "c10d":
        distributed.pop("node_rank")
    return data
