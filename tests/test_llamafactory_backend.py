"""The llamafactory backend: the strategy translation (pure), the template parity with LlamaFactory's
own code, and a real job through `llamafactory-cli train` on a builtin tiny model (the environment is
built by scripts/test.sh, `python -m trainer.llamafactory.env`)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from contract.job_folder import read_job, read_metrics
from contract.strategy import parse_strategy
from contract import llamafactory as translate
from trainer.llamafactory.supervise import metrics_record

from conftest import DATASETS, ROOT

LF_TINY = {
    "description": "test: LoRA through LlamaFactory on the byte-level BPE builtin",
    "fine_tuner": {
        "type": "llamafactory",
        "config": {
            "base_model": {"name": "tiny-llama-bpe", "huggingface_id": "builtin:tiny-llama-bpe"},
            "method": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "training_args": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
                              "logging_steps": 1, "save_steps": 2, "max_seq_length": 256, "seed": 7,
                              "precision": "fp32"},
            "dataset": {"eval_fraction": 0.1},
            "device": "cpu",
        },
    },
}


def _strategy(**config):
    raw = json.loads(json.dumps(LF_TINY))
    for key, value in config.items():
        if isinstance(value, dict):
            raw["fine_tuner"]["config"].setdefault(key, {}).update(value)
        else:
            raw["fine_tuner"]["config"][key] = value
    return parse_strategy("test", raw)


def test_train_config_carries_every_setting():
    conf = translate.train_config(_strategy(), model_path="/m", device="cpu", template="model", dataset_dir="/d",
                                  output_dir="/o", has_eval_file=False)
    assert conf == {
        "stage": "sft", "do_train": True, "model_name_or_path": "/m", "trust_remote_code": False,
        "finetuning_type": "lora", "lora_rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.0, "lora_target": "q_proj,v_proj",
        "dataset": "llamafarm_train", "dataset_dir": "/d", "cutoff_len": 256, "train_on_prompt": False, "packing": False,
        "overwrite_cache": True, "preprocessing_num_workers": 1, "dataloader_num_workers": 0, "output_dir": "/o",
        "num_train_epochs": 1.0, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
        "learning_rate": 1e-2, "lr_scheduler_type": "linear", "warmup_ratio": 0.0, "weight_decay": 0.0,
        "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "max_grad_norm": 1.0, "seed": 7, "data_seed": 7, "logging_steps": 1, "include_num_input_tokens_seen": True,
        "disable_gradient_checkpointing": True, "report_to": "none", "plot_loss": False,
        "max_steps": 4, "save_strategy": "steps", "save_steps": 2, "save_total_limit": 2,
        "val_size": 0.1, "per_device_eval_batch_size": 4, "eval_strategy": "epoch", "use_cpu": True,
    }, "template 'model' leaves LlamaFactory to parse the tokenizer's own template: no template key"


def test_train_config_qlora_full_precision_and_eval_file():
    qlora = _strategy(method={"type": "qlora", "r": 16}, training_args={"gradient_checkpointing": True, "precision": "auto",
                                                                          "max_grad_norm": None, "eval_steps": 5,
                                                                          "torch_compile": True},
                      device="cuda")
    conf = translate.train_config(qlora, model_path="org/m", device="cuda", template="llama3", dataset_dir="/d",
                                  output_dir="/o", has_eval_file=True, resume_from="/o/checkpoint-2")
    assert conf["quantization_bit"] == 4 and conf["lora_rank"] == 16 and conf["template"] == "llama3"
    assert conf["bf16"] is True and "use_cpu" not in conf, "precision auto is bf16 on CUDA"
    assert conf["disable_gradient_checkpointing"] is False and conf["max_grad_norm"] == 0.0
    assert conf["torch_compile"] is True  # only an explicit true; auto (the first test) adds no key
    assert conf["eval_dataset"] == "llamafarm_eval" and "val_size" not in conf
    assert (conf["eval_strategy"], conf["eval_steps"], conf["resume_from_checkpoint"]) == ("steps", 5, "/o/checkpoint-2")
    raw = json.loads(json.dumps(LF_TINY))
    raw["fine_tuner"]["config"]["method"] = {"type": "full"}
    raw["fine_tuner"]["config"]["training_args"]["save_steps"] = None
    full = parse_strategy("test", raw)
    conf = translate.train_config(full, model_path="/m", device="cpu", template="model", dataset_dir="/d",
                                  output_dir="/o", has_eval_file=False)
    assert conf["finetuning_type"] == "full" and "lora_rank" not in conf and conf["save_strategy"] == "no"


def test_dataset_info_registers_messages_rows():
    info = translate.dataset_info("/w/train.jsonl", "/w/eval.jsonl")
    assert set(info) == {"llamafarm_train", "llamafarm_eval"}
    assert info["llamafarm_train"]["formatting"] == "sharegpt"
    assert info["llamafarm_train"]["tags"]["role_tag"] == "role" and info["llamafarm_eval"]["file_name"] == "/w/eval.jsonl"
    assert translate.messages_row(({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"})) == \
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def test_settings_llamafactory_cannot_honour_are_refused(run_cli, tmp_path):
    raw = json.loads(json.dumps(LF_TINY))
    cfg = raw["fine_tuner"]["config"]
    cfg["dataset"].update(format="text", truncation="drop", packing=True, template="alpaca")
    cfg["training_args"].update(report_to="tensorboard", save_best=True)
    cfg["distributed"] = {"mode": "ddp", "nproc_per_node": 2}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"lf_bad": raw}))
    result = run_cli("finetune", "strategies", "validate", path)
    assert result.exit_code == 1
    for key in ("dataset.format: text", "dataset.truncation: drop", "dataset.packing: true",
                "dataset.template: alpaca has no identical LlamaFactory template", "training_args.save_best",
                "training_args.report_to: tensorboard", "distributed.mode: ddp is not supported"):
        assert key in result.output, result.output


def test_log_lines_become_metrics_records():
    train = {"current_steps": 3, "total_steps": 6, "loss": 5.5, "lr": 1e-3, "epoch": 0.5,
             "elapsed_time": "0:01:05", "throughput": 120.5}
    assert metrics_record(train) == [{"step": 3, "total_steps": 6, "epoch": 0.5, "loss": 5.5, "learning_rate": 1e-3,
                                      "grad_norm": None, "tokens_per_second": 120.5, "elapsed": 65.0}]
    evaluation = {"current_steps": 6, "total_steps": 6, "eval_loss": 2.0, "epoch": 1.0}
    assert metrics_record(evaluation) == [{"step": 6, "epoch": 1.0, "eval_loss": 2.0, "eval_perplexity": 7.3891}]


@pytest.fixture(scope="module")
def lf_python():
    from contract import llamafactory as env

    if not env.is_ready():
        pytest.fail("LlamaFactory's environment is missing: scripts/test.sh builds it "
                    "(python -m trainer.llamafactory.env)")
    return env.python_path()


CONVERSATIONS = [
    [{"role": "user", "content": "What is anemia?"}, {"role": "assistant", "content": "Too few red blood cells."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"},
     {"role": "assistant", "content": "Because.\nThat is all."}],
]
# Our template name -> the name given to LlamaFactory ("none": it parses the tokenizer's own template).
PAIRS = {"model": "none", "llama3": "llama3"}


@pytest.fixture(scope="module")
def llamafactory_ids(lf_python):
    """LlamaFactory's encoding of CONVERSATIONS under each template, from one run of its own code."""
    from trainer.models.builtin import builtin_path

    out = subprocess.run([str(lf_python), str(ROOT / "tests" / "llamafactory_template_ids.py"),
                          str(builtin_path("builtin:tiny-llama-bpe")), *PAIRS.values()],
                         input=json.dumps(CONVERSATIONS), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("ours", sorted(PAIRS))
def test_template_token_parity_with_llamafactory(llamafactory_ids, tokenizers, ours):
    """What makes the mapping in translate.TEMPLATES honest: LlamaFactory's own template code gives
    the same token ids and the same trained positions as our encoder, system and multi-turn included."""
    from contract.chat_templates import get_template
    from trainer.data.tokenize import ConversationEncoder, choose_template

    assert set(translate.TEMPLATES) == set(PAIRS), "every mapped template is checked here"
    tok = tokenizers["tiny-llama-bpe"]
    template = choose_template("auto", tok)[0] if ours == "model" else get_template(ours)
    encoder = ConversationEncoder(tok, template, 512, False, "truncate")
    for conversation, lf in zip(CONVERSATIONS, llamafactory_ids[PAIRS[ours]]):
        ids, labels = encoder.encode(conversation)
        assert ids == lf["ids"]
        assert [label != -100 for label in labels] == lf["trained"]


def test_llamafactory_job_trains_is_monitored_and_generates(run_cli, tmp_path, lf_python):
    path = tmp_path / "lf.yaml"
    path.write_text(yaml.safe_dump({"lf_tiny": LF_TINY}))
    result = run_cli("finetune", "start", "--strategy", "lf_tiny", "--strategy-file", path,
                     "--dataset", DATASETS / "medical_qa.jsonl", "--json", "--foreground")
    started = json.loads(result.stdout[result.stdout.index("{"):result.stdout.index("}") + 1])
    folder = Path(started["job_dir"])
    job = read_job(folder)
    assert job["status"] == "completed", (folder / "train.log").read_text()[-3000:]
    assert started["runner"] == "llamafactory" and job["decisions"]["backend"]["value"] == "llamafactory"
    conf = yaml.safe_load((folder / "llamafactory" / "train.yaml").read_text())
    assert conf["use_cpu"] is True and conf["max_steps"] == 4 and "template" not in conf

    metrics = read_metrics(folder)
    train = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4] and all(m["total_steps"] == 4 for m in train)
    assert all(m["tokens_per_second"] > 0 for m in train)
    assert [m["step"] for m in metrics if "eval_loss" in m] == [4]
    assert job["final_loss"] == train[-1]["loss"]

    final = folder / "final"
    assert sorted(p.name for p in final.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "strategy.yaml",
        "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 8
    assert sorted(p.name for p in (folder / "checkpoints").iterdir() if p.name.startswith("checkpoint-")) == \
        ["checkpoint-2", "checkpoint-4"]

    monitor = run_cli("finetune", "monitor", "--job-id", folder.name, "--json")
    summary = json.loads(monitor.stdout)
    assert (summary["status"], summary["step"], summary["total_steps"]) == ("completed", 4, 4)

    answer = run_cli("generate", "--model", folder.name, "--prompt", "What is anemia?", "--max-new-tokens", "8")
    assert answer.exit_code == 0

    exported = run_cli("finetune", "export", "--model-path", folder.name, "--format", "gguf", "--json")
    assert exported.exit_code == 0, exported.output
    report = json.loads(exported.stdout[exported.stdout.index("{"):])
    assert report["verification"]["passed"] and report["verification"]["tokenization_equal"]
    assert (Path(report["output"]) / "model.gguf").is_file(), "LlamaFactory's adapter exports through our exporter"


def test_llamafactory_job_stops_and_resumes(run_cli, tmp_path, lf_python):
    import time

    raw = json.loads(json.dumps(LF_TINY))
    # Long enough that the stop below lands while it trains: a quiet machine runs ~20 steps/s here.
    raw["fine_tuner"]["config"]["training_args"].update(max_steps=400)
    raw["fine_tuner"]["config"]["dataset"] = {}
    path = tmp_path / "lf.yaml"
    path.write_text(yaml.safe_dump({"lf_long": raw}))
    result = run_cli("finetune", "start", "--strategy", "lf_long", "--strategy-file", path,
                     "--dataset", DATASETS / "medical_qa.jsonl", "--json")
    folder = Path(json.loads(result.stdout[result.stdout.index("{"):])["job_dir"])
    deadline = time.time() + 240
    # Any complete checkpoint (save_total_limit deletes the early ones while training goes on).
    while not list((folder / "checkpoints").glob("checkpoint-*/trainer_state.json")) and time.time() < deadline \
            and read_job(folder)["status"] in ("pending", "running"):
        time.sleep(0.1)
    assert run_cli("finetune", "stop", "--job-id", folder.name).exit_code == 0
    while read_job(folder)["status"] == "running" and time.time() < deadline:
        time.sleep(0.5)
    job = read_job(folder)
    assert job["status"] == "stopped", (folder / "train.log").read_text()[-3000:]
    assert not (folder / "final").exists() and read_metrics(folder)[-1]["step"] < 400

    resumed = run_cli("finetune", "resume", "--job-id", folder.name, "--foreground")
    assert resumed.exit_code == 0 and read_job(folder)["status"] == "completed", (folder / "train.log").read_text()[-3000:]
    conf = yaml.safe_load((folder / "llamafactory" / "train.yaml").read_text())
    assert conf["resume_from_checkpoint"].startswith(str(folder / "checkpoints" / "checkpoint-"))
    assert [m["step"] for m in read_metrics(folder)] == list(range(1, 401)), "one unbroken run of steps"
    assert (folder / "final" / "adapter_model.safetensors").is_file()
