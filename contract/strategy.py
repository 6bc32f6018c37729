"""The strategy schema: every training setting, typed, with its default.

This module is the only place a strategy default lives. It imports no torch, so the host CLI, the
trainer and the tests all validate the same way. Unknown keys and wrong types are rejected; numbers
written as strings ("3e-4") are coerced; every error is reported at once with its path.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from contract.export_options import FORMATS, MERGED_PRECISIONS, QUANTIZATIONS, VERIFY_PROMPTS_FROM_DATA


class _Strict(BaseModel):
    # extra="forbid": a misspelt key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_default=True)


class BaseModelSpec(_Strict):
    name: str = Field(description="Short display name of the base model, e.g. llama3.2-3b.")
    huggingface_id: str = Field(
        description="Hub id, local folder, builtin:<name> (builtin:tiny-llama-spm, builtin:tiny-llama-bpe), "
        "or a previous job's output: job:<job_id> or its folder (a LoRA output is merged into its base).",
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
    target_modules: list[str] | Literal["auto"] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], min_length=1,
        description="Module names that get LoRA adapters, or auto: every linear layer of the model but the output layer.",
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
    torch_compile: Literal["auto"] | bool = Field(
        default="auto",
        description="Compile the decoder layers with torch.compile (faster steps after a one-time compile); "
        "auto: on CPU when the estimated training time repays the compile.",
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


class OllamaSpec(_Strict):
    system: str | None = Field(default=None, description="SYSTEM prompt written into the Modelfile; null: none.")
    temperature: float | None = Field(default=None, ge=0.0, description="Sampling temperature; null: Ollama's default.")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="Nucleus sampling; null: Ollama's default.")
    top_k: int | None = Field(default=None, gt=0, description="Top-k sampling; null: Ollama's default.")
    repeat_penalty: float | None = Field(default=None, gt=0.0, description="Repetition penalty; null: Ollama's default.")
    num_ctx: int | None = Field(
        default=None, gt=0, description="Context window; null: the training max_seq_length."
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
    nproc_per_node: int = Field(default=1, gt=0, description="Training processes on each machine: one per GPU.")
    nnodes: int = Field(default=1, gt=0, description="Machines taking part; each starts the same strategy.")
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
