"""The LlamaFactory backend as the host and its job process both see it: where its managed environment
lives, which strategies it can run, and a strategy translated into its train config and
dataset_info.json. Pure: no torch, no files; trainer/llamafactory/ builds the environment and runs
the job, writing what these functions return.

Settings LlamaFactory cannot honour the way our trainer does are refused (`problems`), never quietly
dropped or approximated. The data reaches LlamaFactory as the conversations our own reader made of it
(written once as OpenAI-style `messages` rows), so both backends train on the same prompt text: a
direct column mapping would let LlamaFactory join an alpaca instruction and input its own way.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from contract.chat_templates import TEMPLATES as CHAT_TEMPLATES
from contract.paths import cache_root

if TYPE_CHECKING:
    from contract.strategy import Strategy

LLAMAFACTORY_VERSION = "0.9.5"
TORCH_PIN = "torch==2.13.0"  # the version requirements/cpu.txt installs for llamafarm itself
READY = ".llamafarm-ready"  # written last: a venv without it is half-built and is rebuilt


def env_dir() -> Path:
    return cache_root() / "envs" / f"llamafactory-{LLAMAFACTORY_VERSION}"


def cli_path() -> Path:
    return env_dir() / "bin" / "llamafactory-cli"


def python_path() -> Path:
    return env_dir() / "bin" / "python"


def is_ready() -> bool:
    return (env_dir() / READY).is_file() and cli_path().is_file()


DATASET_NAME = "llamafarm_train"
EVAL_DATASET_NAME = "llamafarm_eval"

# Our chat template -> LlamaFactory's template of the same text; None: LlamaFactory parses the
# tokenizer's own Jinja template (what `template: auto` means for a model that ships one).
# tests/test_llamafactory_backend.py checks each pair token for token in LlamaFactory's environment.
TEMPLATES: dict[str, str | None] = {
    "model": None,
    "llama3": "llama3",
}


def problems(strategy: Strategy) -> list[str]:
    """Every setting of the strategy LlamaFactory cannot honour, with its path and what to do."""
    cfg = strategy.cfg
    args = cfg.training_args
    data = cfg.dataset
    out = []
    at = "fine_tuner.config."
    if cfg.method.stage != "sft":
        out.append(f"{at}method.stage: {cfg.method.stage} is trained by the built-in trainer only; "
                   "use fine_tuner.type: pytorch")
    if data.format == "text":
        out.append(f"{at}dataset.format: text rows (every token trained, no template) are not supported by the "
                   "llamafactory backend, which trains conversations; use fine_tuner.type: pytorch")
    if data.truncation == "drop":
        out.append(f"{at}dataset.truncation: drop is not supported by LlamaFactory, which always truncates; "
                   "set truncation: truncate")
    if data.packing is True:
        out.append(f"{at}dataset.packing: true is not supported: LlamaFactory's packing lets packed rows attend to "
                   "each other on CPU attention; set packing: auto (off with this backend) or false")
    if data.template != "auto" and data.template in CHAT_TEMPLATES and data.template not in TEMPLATES:
        out.append(f"{at}dataset.template: {data.template} has no identical LlamaFactory template; use auto or one "
                   f"of {', '.join(t for t in TEMPLATES if t != 'model')}")
    if args.save_best:
        out.append(f"{at}training_args.save_best is not supported by the llamafactory backend; remove it")
    if args.report_to != "none":
        out.append(f"{at}training_args.report_to: {args.report_to} is not installed in LlamaFactory's environment; "
                   "set report_to: none (metrics.jsonl and `monitor --plot` still work)")
    if cfg.distributed.mode != "none":
        out.append(f"{at}distributed.mode: {cfg.distributed.mode} is not supported by the llamafactory backend, which "
                   "trains in one process here; set mode: none or use fine_tuner.type: pytorch")
    if cfg.runner not in ("auto", "llamafactory"):
        out.append(f"{at}runner: {cfg.runner}: the llamafactory backend runs in its own environment; set runner: auto")
    return out


def _precision(setting: str, device: str) -> dict:
    if setting == "auto":
        # Our trainer's auto also picks bf16 only where the device computes it natively.
        return {"bf16": True} if device == "cuda" else {}
    return {"bf16": True} if setting == "bf16" else {"fp16": True} if setting == "fp16" else {}


def _method(cfg, device: str) -> dict:
    method = cfg.method
    if method.type == "full":
        return {"finetuning_type": "full"}
    out = {
        "finetuning_type": "lora",
        "lora_rank": method.r,
        "lora_alpha": method.alpha,
        "lora_dropout": method.dropout,
        # LlamaFactory's "all" is every linear layer but the output one, as our auto.
        "lora_target": "all" if method.target_modules == "auto" else ",".join(method.target_modules),
    }
    if method.type == "qlora" and device == "cuda":
        out["quantization_bit"] = 4  # our QLoRA is 4-bit NF4 through bitsandbytes, as is LlamaFactory's
    return out


def train_config(strategy: Strategy, *, model_path: str, device: str, template: str, dataset_dir: str,
                 output_dir: str, has_eval_file: bool, resume_from: str | None = None) -> dict:
    """LlamaFactory's `llamafactory-cli train` YAML, as a dict.

    model_path: the base model folder or hub id; device: the decided device (cpu, cuda, mps);
    template: our template's name, or "model" for the model's own; dataset_dir: the folder holding
    dataset_info.json; output_dir: where checkpoints and the adapter go."""
    cfg = strategy.cfg
    args = cfg.training_args
    data = cfg.dataset
    conf: dict = {
        "stage": "sft",
        "do_train": True,
        "model_name_or_path": model_path,
        "trust_remote_code": cfg.base_model.trust_remote_code,
        **({"model_revision": cfg.base_model.revision} if cfg.base_model.revision else {}),
        **_method(cfg, device),
        "dataset": DATASET_NAME,
        "dataset_dir": dataset_dir,
        "cutoff_len": args.max_seq_length,
        "train_on_prompt": data.train_on_inputs,
        "packing": False,
        "overwrite_cache": True,
        "preprocessing_num_workers": 1,
        "dataloader_num_workers": 0,
        "output_dir": output_dir,
        "num_train_epochs": args.num_train_epochs,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": args.lr_scheduler_type,  # ours are all transformers' names
        "warmup_ratio": args.warmup_ratio,
        "weight_decay": args.weight_decay,
        "adam_beta1": args.adam_beta1,
        "adam_beta2": args.adam_beta2,
        "adam_epsilon": args.adam_epsilon,
        # transformers clips only for a positive norm; our null means no clipping.
        "max_grad_norm": args.max_grad_norm if args.max_grad_norm is not None else 0.0,
        "seed": args.seed,
        "data_seed": args.seed,
        "logging_steps": args.logging_steps,
        "include_num_input_tokens_seen": True,  # LlamaFactory's log then carries tokens/s for `monitor`
        # LlamaFactory turns checkpointing on unless told otherwise; ours is off unless asked for.
        "disable_gradient_checkpointing": not args.gradient_checkpointing,
        "report_to": "none",
        "plot_loss": False,
        # transformers' Trainer compiles the whole model; only an explicit true asks it to.
        **({"torch_compile": True} if args.torch_compile is True else {}),
        **_precision(args.precision, device),
    }
    if TEMPLATES.get(template, template) is not None:
        conf["template"] = TEMPLATES.get(template, template)
    if args.max_steps:
        conf["max_steps"] = args.max_steps
    if args.save_steps:
        conf.update(save_strategy="steps", save_steps=args.save_steps, save_total_limit=args.save_total_limit)
    else:
        conf["save_strategy"] = "no"
    if has_eval_file or data.eval_fraction:
        if has_eval_file:
            conf["eval_dataset"] = EVAL_DATASET_NAME
        else:
            conf["val_size"] = data.eval_fraction
        conf["per_device_eval_batch_size"] = args.per_device_train_batch_size
        conf.update({"eval_strategy": "steps", "eval_steps": args.eval_steps} if args.eval_steps
                    else {"eval_strategy": "epoch"})
    if device == "cpu":
        conf["use_cpu"] = True
    if resume_from:
        conf["resume_from_checkpoint"] = resume_from
    return conf


def _entry(file_name: str) -> dict:
    # OpenAI-style messages rows, the form supervise.py writes whatever the user's file format was.
    return {
        "file_name": file_name,
        "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                 "assistant_tag": "assistant", "system_tag": "system"},
    }


def dataset_info(train_file: str, eval_file: str | None = None) -> dict:
    """dataset_info.json registering the training (and eval) conversations."""
    info = {DATASET_NAME: _entry(train_file)}
    if eval_file:
        info[EVAL_DATASET_NAME] = _entry(eval_file)
    return info


def messages_row(messages) -> dict:
    """One conversation as the row `dataset_info` describes."""
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
