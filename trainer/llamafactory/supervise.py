"""The process of a llamafactory job: what `python -m trainer train` is for the pytorch backend.

    python -m trainer.llamafactory.supervise JOB_DIR

It reads only the job folder, writes LlamaFactory's config and data into JOB_DIR/llamafactory/, runs
`llamafactory-cli train` in LlamaFactory's own environment, turns each line of its trainer_log.jsonl
into a metrics.jsonl record (so `monitor` works unchanged), and finally puts the adapter, the
tokenizer and the strategy into final/ in the layout trainer/saving.py writes, so `generate`,
`evaluate` and the exporter read it like any job. Its checkpoints go to checkpoints/ (transformers'
own checkpoint-N folders), so `stop` then `resume` continue from the newest one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from contract.errors import UserError
from contract.job_folder import (
    CHECKPOINTS_DIR,
    FINAL_DIR,
    STRATEGY_FILE,
    append_metrics,
    cut_metrics,
    read_job,
    read_job_strategy,
    update_job,
)
from contract.plan import plan_of
from trainer.lifecycle import Stopped, run_job

WORK_DIR = "llamafactory"  # inside the job folder: train.yaml, dataset_info.json, the data as conversations
LF_LOG = "trainer_log.jsonl"
# Weight files of an adapter or a full model; LlamaFactory's training records stay in checkpoints/.
_WEIGHT_FILES = ("adapter_config.json", "adapter_model.safetensors", "config.json", "generation_config.json",
                 "model.safetensors", "model.safetensors.index.json")


def _seconds(clock: str | None) -> float | None:
    """LlamaFactory's "H:MM:SS" elapsed time in seconds."""
    if not clock:
        return None
    total = 0.0
    for part in clock.split(":"):
        total = total * 60 + float(part)
    return total


def metrics_record(line: dict, steps_per_epoch: float | None = None) -> list[dict]:
    """One trainer_log.jsonl line as our metrics.jsonl records (a training and/or an eval record)."""
    import math

    step = line.get("current_steps")
    out = []
    if line.get("loss") is not None:
        out.append({
            "step": step,
            "total_steps": line.get("total_steps"),
            "epoch": line.get("epoch"),
            "loss": line["loss"],
            "learning_rate": line.get("lr"),
            "grad_norm": None,
            "tokens_per_second": line.get("throughput"),
            "elapsed": _seconds(line.get("elapsed_time")),
        })
    if line.get("eval_loss") is not None:
        out.append({"step": step, "epoch": line.get("epoch"), "eval_loss": line["eval_loss"],
                    "eval_perplexity": round(math.exp(min(line["eval_loss"], 50)), 4)})
    return out


class _LogFollower:
    """Copies new trainer_log.jsonl lines into metrics.jsonl as they are written."""

    def __init__(self, job_dir: Path, log: Path):
        self.job_dir, self.log, self.offset, self.last = job_dir, log, 0, {}

    def poll(self) -> None:
        if not self.log.exists():
            return
        with open(self.log) as f:
            f.seek(self.offset)
            while True:
                line = f.readline()
                if not line.endswith("\n"):
                    break  # half-written; read it next time
                self.offset = f.tell()
                data = json.loads(line)
                if data.get("total_steps") and data.get("total_steps") != self.last.get("total_steps"):
                    update_job(self.job_dir, total_steps=data["total_steps"])
                for record in metrics_record(data):
                    append_metrics(self.job_dir, record)
                    if "loss" in record:
                        self.last = record
                        print(f"step {record['step']}/{record['total_steps']} loss {record['loss']:.4f}", flush=True)


def _write_data(job: dict, cfg, work: Path) -> tuple[str, str | None]:
    """The dataset (and eval dataset) as conversations our reader made of them, one JSON row each."""
    from contract.llamafactory import messages_row
    from inputs.data.records import read_dataset

    def write(source: str, name: str) -> str:
        rows = read_dataset(Path(source), cfg.dataset.format, cfg.dataset.columns, cfg.dataset.replace)
        calls = [c.where for c in rows if c.tools or any(m["role"] == "tool" for m in c.messages)]
        if calls:  # messages_row carries role and content only: calls would be lost, not trained
            raise UserError(f"{calls[0]}: tool-calling rows are not passed to the llamafactory backend in this "
                            "version; use fine_tuner.type: pytorch")
        path = work / name
        path.write_text("".join(json.dumps(messages_row(c.messages), ensure_ascii=False) + "\n" for c in rows))
        return str(path)

    train = write(job["dataset"], "train.jsonl")
    return train, write(job["eval_dataset"], "eval.jsonl") if job.get("eval_dataset") else None


def _finalize(folder: Path, strategy_text: str, template, model_path: str, output: Path) -> Path:
    """final/: LlamaFactory's weights, the base tokenizer carrying the training template, the strategy."""
    from transformers import AutoTokenizer

    target = folder / FINAL_DIR
    tmp = folder / f".{FINAL_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in _WEIGHT_FILES:
        if (output / name).is_file():
            shutil.copy2(output / name, tmp / name)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.chat_template = template.jinja  # what trainer/saving.py's artifacts carry too
    tokenizer.save_pretrained(tmp)
    (tmp / STRATEGY_FILE).write_text(strategy_text)
    if target.exists():
        shutil.rmtree(target)
    os.rename(tmp, target)  # readers see a complete folder or none
    return target


def _train(folder: Path, child: dict) -> None:
    from contract import llamafactory as lf
    from trainer.llamafactory import env
    from trainer.data.tokenize import choose_template
    from inputs.models.source import check_available
    from trainer.models import source

    strategy, strategy_text = read_job_strategy(folder)
    cfg = strategy.cfg
    job = read_job(folder)
    problems = lf.problems(strategy)
    if problems:
        raise UserError("the llamafactory backend cannot run this strategy: " + "; ".join(problems))
    plan = plan_of(job)  # device and method as `start` decided them
    device, method = plan.device, plan.method
    decisions = {"backend": {"value": "llamafactory", "reason": f"fine_tuner.type; LlamaFactory {lf.LLAMAFACTORY_VERSION}"}}
    print(f"backend: llamafactory {lf.LLAMAFACTORY_VERSION} (fine_tuner.type; runs `llamafactory-cli train` in its own environment)", flush=True)
    for line in plan.lines():
        print(f"plan: {line}", flush=True)
    env.ensure_env(echo=lambda m: print(m, flush=True))

    print(f"base model: {cfg.base_model.name} = {cfg.base_model.huggingface_id} "
          f"({check_available(cfg.base_model)})", flush=True)
    model_path = source.resolve(cfg.base_model)
    from transformers import AutoTokenizer

    template, template_reason = choose_template(cfg.dataset.template, AutoTokenizer.from_pretrained(model_path))
    if template.name not in lf.TEMPLATES:
        raise UserError(f"{template_reason}, which has no identical LlamaFactory template; set "
                        f"fine_tuner.config.dataset.template to one of {', '.join(t for t in lf.TEMPLATES if t != 'model')}")
    lf_template = lf.TEMPLATES[template.name]
    print(f"{template_reason}; LlamaFactory template: {lf_template or 'parsed from the tokenizer'}", flush=True)
    decisions["template"] = {"value": template.name, "reason": template_reason}

    work = folder / WORK_DIR
    work.mkdir(exist_ok=True)
    train_file, eval_file = _write_data(job, cfg, work)
    output = folder / CHECKPOINTS_DIR
    resume = str(folder / job["resume_from"]) if job.get("resume_from") else None
    if method.value == "lora" and cfg.method.type == "qlora":
        cfg.method.type = "lora"  # QLoRA fell back to LoRA (fallback_to_lora), as choose_method decided
    config = lf.train_config(strategy, model_path=model_path, device=device.value, template=template.name,
                                    dataset_dir=str(work), output_dir=str(output), has_eval_file=bool(eval_file),
                                    resume_from=resume)
    (work / "dataset_info.json").write_text(json.dumps(lf.dataset_info(train_file, eval_file), indent=2) + "\n")
    config_path = work / "train.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    update_job(folder, decisions=decisions)
    print(f"llamafactory: config {config_path}", flush=True)

    follower = _LogFollower(folder, output / LF_LOG)
    if not resume:
        (output / LF_LOG).unlink(missing_ok=True)
    else:
        follower.offset = (output / LF_LOG).stat().st_size if (output / LF_LOG).exists() else 0
        cut_metrics(folder, int(Path(resume).name.rpartition("-")[2]))
    if child["stop"]:
        raise Stopped()
    started = time.time()
    # Offline and quiet where the host is; LlamaFactory's own version check is what the venv pins.
    child_env = {**os.environ, "DISABLE_VERSION_CHECK": "1", "PYTHONUNBUFFERED": "1"}
    child_env.pop("PYTHONPATH", None)  # llamafarm's packages must not shadow LlamaFactory's environment
    proc = subprocess.Popen([str(lf.cli_path()), "train", str(config_path)], cwd=work, env=child_env,
                            stdin=subprocess.DEVNULL)
    child["proc"] = proc
    while proc.poll() is None:
        follower.poll()
        time.sleep(1.0)
    follower.poll()
    if child["stop"]:
        raise Stopped()
    if proc.returncode:
        raise UserError(f"llamafactory-cli train exited with code {proc.returncode}; see {folder / 'train.log'}")
    final = _finalize(folder, strategy_text, template, model_path, output)
    print(f"final weights: {final}", flush=True)
    results = json.loads((output / "train_results.json").read_text()) if (output / "train_results.json").exists() else {}
    last = follower.last
    update_job(folder, final_loss=last.get("loss"), train_seconds=round(results.get("train_runtime", time.time() - started), 2),
               tokens_per_second=last.get("tokens_per_second"))


def run(folder: Path) -> int:
    child: dict = {}

    def stop_child() -> None:
        if child.get("proc") and child["proc"].poll() is None:
            child["proc"].terminate()

    def train(folder: Path, stop) -> None:
        child["stop"] = stop
        _train(folder, child)

    return run_job(folder, train, "stop requested: LlamaFactory ends; its newest checkpoint (save_steps) is what "
                                  "resume continues from", on_stop=stop_child)


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1])))
