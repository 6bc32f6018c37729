"""A battery of bad inputs across strategies, datasets, CLI arguments and job operations.

Each case: exit code 1, the exact message expected, no traceback, and LLAMAFARM_HOME byte for byte as
it was before (nothing lost, nothing half-written, no job that looks real)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from contract.job_folder import update_job
from contract.strategy import parse_strategy
from orchestrator import jobs
from orchestrator.runners import RUNNERS
from orchestrator.plan import make_plan

from conftest import DATASETS

QA = str(DATASETS / "medical_qa.jsonl")
GOOD = {"instruction": "What is flu?", "output": "A viral infection."}


def _strategy(**config):
    base = {"base_model": {"name": "spm", "huggingface_id": "builtin:tiny-llama-spm"}, "device": "cpu"}
    return {"fine_tuner": {"config": {**base, **config}}}


@pytest.fixture
def world(tmp_path):
    """Files and jobs the cases point at."""
    files = tmp_path / "inputs"
    files.mkdir()

    def jsonl(name, rows):
        path = files / name
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        return str(path)

    strategies = {
        "neg_lr": _strategy(training_args={"learning_rate": -1}),
        "rank_zero": _strategy(method={"type": "lora", "r": 0}),
        "unknown_method": _strategy(method={"type": "prefix_tuning"}),
        "typo_key": _strategy(training_args={"learnig_rate": 1e-4}),
        "wrong_type": _strategy(training_args={"per_device_train_batch_size": "two"}),
        "big_dropout": _strategy(method={"dropout": 1.5}),
        "qlora_cpu": _strategy(method={"type": "qlora"}),
        "bad_template": _strategy(dataset={"template": "vicuna"}),
        "eval_steps_no_eval": _strategy(training_args={"eval_steps": 5}),
        "two_eval_sources": _strategy(dataset={"eval_fraction": 0.1, "eval_file": "x.jsonl"}),
        "missing_eval_file": _strategy(dataset={"eval_file": str(files / "nope.jsonl")}),
        "csv_columns": _strategy(dataset={"columns": {"output": "answer"}}),
    }
    (files / "mine.yaml").write_text(yaml.safe_dump(strategies))
    (files / "broken.yaml").write_text("a: [1, 2\n")
    (files / "bytes.jsonl").write_bytes(b'{"instruction": "caf\xe9", "output": "x"}\n')
    (files / "notes.txt").write_text("hello")
    (files / "qa.csv").write_text("instruction,reply\nWhat is flu?,A virus.\n")

    made = {}
    for name, status, pid in (("pending", "pending", None), ("completed", "completed", 1), ("failed", "failed", 1),
                              ("stopped", "stopped", 1)):
        strategy = parse_strategy("t", _strategy())
        folder = jobs.create(name, strategy, Path("t.yaml"), Path(QA), None, {}, make_plan(strategy, "local"))
        update_job(folder, status=status, pid=pid, error="boom" if status == "failed" else None)
        made[name] = folder.name
    # A stopped job whose job.json was edited by hand: a thread count the trainer could not run with.
    strategy = parse_strategy("t", _strategy())
    folder = jobs.create("edited", strategy, Path("t.yaml"), Path(QA), None, {}, make_plan(strategy, "local"))
    update_job(folder, status="stopped", pid=1, decisions={"threads": {"value": "two", "reason": "hand-edited"}})
    made["edited"] = folder.name
    (jobs.job_dir(made["completed"]) / "final").mkdir()
    # What the trainer saves beside final weights (the job's own strategy.yaml; no weights needed here).
    shutil.copy(jobs.job_dir(made["completed"]) / "strategy.yaml", jobs.job_dir(made["completed"]) / "final")

    return {
        "files": files,
        "mine": str(files / "mine.yaml"),
        "jobs": made,
        "bad_json": jsonl("bad_json.jsonl", [GOOD, '{"instruction": "x", "output": ']),
        "empty": jsonl("empty.jsonl", []),
        "missing_field": jsonl("missing.jsonl", [GOOD, {"instruction": "no answer"}]),
        "mixed": jsonl("mixed.jsonl", [GOOD, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]),
        "bad_role": jsonl("role.jsonl", [{"messages": [{"role": "doctor", "content": "a"}]}]),
        "no_assistant": jsonl("noasst.jsonl", [{"messages": [{"role": "user", "content": "a"}]}]),
        "wrong_type_row": jsonl("types.jsonl", [{"instruction": "a", "output": ["b"]}]),
    }


def _cases():
    s = lambda *extra: ["run", "--strategy", *extra]  # noqa: E731
    return [
        # strategies and --set
        ("negative learning rate", lambda w: s("neg_lr", "--strategy-file", w["mine"], "--dataset", QA),
         "fine_tuner.config.training_args.learning_rate: Input should be greater than 0"),
        ("r: 0", lambda w: s("rank_zero", "--strategy-file", w["mine"], "--dataset", QA),
         "fine_tuner.config.method.r: Input should be greater than 0"),
        ("unknown method", lambda w: s("unknown_method", "--strategy-file", w["mine"], "--dataset", QA),
         "fine_tuner.config.method.type: Input should be 'lora', 'qlora' or 'full'"),
        ("misspelt key", lambda w: s("typo_key", "--strategy-file", w["mine"], "--dataset", QA),
         "fine_tuner.config.training_args.learnig_rate: unknown key"),
        ("wrong type", lambda w: s("wrong_type", "--strategy-file", w["mine"], "--dataset", QA),
         "per_device_train_batch_size: Input should be a valid integer, unable to parse string as an integer"),
        ("dropout above 1", lambda w: s("big_dropout", "--strategy-file", w["mine"], "--dataset", QA),
         "fine_tuner.config.method.dropout: Input should be less than 1"),
        ("qlora on cpu", lambda w: s("qlora_cpu", "--strategy-file", w["mine"], "--dataset", QA),
         "qlora needs CUDA but device is cpu; use lora, or set method.fallback_to_lora: true"),
        ("unknown template", lambda w: s("bad_template", "--strategy-file", w["mine"], "--dataset", QA),
         "unknown template 'vicuna'; valid: auto, alpaca, chatml, chatml-smollm2, gemma, llama2, llama3, mistral, mistral-v3, phi3, qwen2.5"),
        ("eval_steps without eval data", lambda w: s("eval_steps_no_eval", "--strategy-file", w["mine"], "--dataset", QA),
         "training_args.eval_steps need eval data: set dataset.eval_fraction or dataset.eval_file"),
        ("two eval sources", lambda w: s("two_eval_sources", "--strategy-file", w["mine"], "--dataset", QA),
         "set eval_fraction or eval_file, not both"),
        ("unknown strategy", lambda w: s("tiny_dmeo", "--dataset", QA),
         "unknown strategy 'tiny_dmeo'; did you mean tiny_demo, tiny_dpo?"),
        ("--set unknown key", lambda w: s("tiny_demo", "--dataset", QA, "--set", "training_args.warmup=3"),
         "training_args has no key 'warmup'"),
        ("--set without =", lambda w: s("tiny_demo", "--dataset", QA, "--set", "seed"),
         "--set 'seed': expected PATH=VALUE"),
        ("--set on a section", lambda w: s("tiny_demo", "--dataset", QA, "--set", "method=lora"),
         "fine_tuner.config.method is a section; set one of its keys instead"),
        ("--set bad value", lambda w: s("tiny_demo", "--dataset", QA, "--set", "training_args.seed=-3"),
         "fine_tuner.config.training_args.seed: Input should be greater than or equal to 0"),
        ("--set adam_beta2 of 1", lambda w: s("tiny_demo", "--dataset", QA, "--set", "training_args.adam_beta2=1"),
         "fine_tuner.config.training_args.adam_beta2: Input should be less than 1"),
        ("unknown runner", lambda w: s("tiny_demo", "--dataset", QA, "--runner", "k8s"),
         f"unknown runner 'k8s'; valid: {', '.join(RUNNERS)}"),
        ("llamafactory strategy off CUDA", lambda w: s("llamafactory_advanced", "--dataset", QA),
         "device 'cuda' is not available on this machine"),
        ("device not present", lambda w: s("cuda_fine_tuning", "--dataset", QA),
         "device 'cuda' is not available on this machine"),
        ("hub model offline", lambda w: s("cpu_fine_tuning", "--dataset", QA),
         "base model TinyLlama/TinyLlama-1.1B-Chat-v1.0 is not in the local Hugging Face cache and HF_HUB_OFFLINE=1"),
        ("strategy file not YAML", lambda w: ["finetune", "strategies", "validate", str(w["files"] / "broken.yaml")],
         "broken.yaml:2: not valid YAML"),
        ("strategy file missing", lambda w: s("tiny_demo", "--dataset", QA, "--strategy-file", "nope.yaml"),
         "strategy path nope.yaml does not exist"),
        # datasets
        ("dataset missing", lambda w: s("tiny_demo", "--dataset", "nope.jsonl"), "dataset nope.jsonl does not exist"),
        ("dataset is a plain folder", lambda w: s("tiny_demo", "--dataset", str(w["files"])),
         "is a folder but not a saved Hugging Face dataset"),
        ("malformed JSONL", lambda w: s("tiny_demo", "--dataset", w["bad_json"]), "bad_json.jsonl:2: not valid JSON"),
        ("empty dataset", lambda w: s("tiny_demo", "--dataset", w["empty"]), "empty.jsonl has no rows"),
        ("row missing a field", lambda w: s("tiny_demo", "--dataset", w["missing_field"]),
         "missing.jsonl:2: alpaca row is missing 'output'"),
        ("mixed formats", lambda w: s("tiny_demo", "--dataset", w["mixed"]), "mixes formats (alpaca, chat)"),
        ("unknown role", lambda w: s("tiny_demo", "--dataset", w["bad_role"]),
         "role.jsonl:1: messages[0].role 'doctor' is not one of system, user, assistant"),
        ("no assistant turn", lambda w: s("tiny_demo", "--dataset", w["no_assistant"]),
         "noasst.jsonl:1: conversation has no assistant turn"),
        ("wrong type in a row", lambda w: s("tiny_demo", "--dataset", w["wrong_type_row"]),
         "types.jsonl:1: 'output' must be a string, got list"),
        ("invalid UTF-8", lambda w: s("tiny_demo", "--dataset", str(w["files"] / "bytes.jsonl")),
         "bytes.jsonl:1: not UTF-8 text"),
        ("unknown file type", lambda w: s("tiny_demo", "--dataset", str(w["files"] / "notes.txt")),
         "unknown file type '.txt'"),
        ("CSV missing a mapped column", lambda w: s("csv_columns", "--strategy-file", w["mine"], "--dataset",
                                                    str(w["files"] / "qa.csv")),
         "qa.csv:2: column 'answer' (from dataset.columns) is missing"),
        ("eval file missing", lambda w: s("missing_eval_file", "--strategy-file", w["mine"], "--dataset", QA),
         "nope.jsonl does not exist"),
        # job operations
        ("monitor an unknown job", lambda w: ["finetune", "monitor", "--job-id", "ghost"], "no job with id 'ghost'"),
        ("job id with path traversal", lambda w: ["finetune", "stop", "--job-id", "../../etc"], "invalid job id '../../etc'"),
        ("stop a finished job", lambda w: ["finetune", "stop", "--job-id", w["jobs"]["completed"]],
         "already ended (completed); nothing to stop"),
        ("resume a job that never started", lambda w: ["finetune", "resume", "--job-id", w["jobs"]["pending"]],
         "is pending; only a stopped or failed job can be resumed"),
        ("resume a completed job", lambda w: ["finetune", "resume", "--job-id", w["jobs"]["completed"]],
         "already completed; start a new job to train further"),
        ("resume a hand-edited job", lambda w: ["finetune", "resume", "--job-id", w["jobs"]["edited"]],
         'decisions.threads is {"reason": "hand-edited", "value": "two"}, but the run this resumes must have '
         "recorded its threads as"),
        ("resume without a checkpoint", lambda w: ["finetune", "resume", "--job-id", w["jobs"]["failed"]],
         "has no complete checkpoint to resume from"),
        ("generate from a failed job", lambda w: ["generate", "--model", w["jobs"]["failed"], "--prompt", "hi"],
         "is failed: boom; only a completed job has final weights"),
        ("evaluate a stopped job", lambda w: ["finetune", "evaluate", "--model", w["jobs"]["stopped"], "--dataset", QA],
         "is stopped; only a completed job has final weights"),
        ("evaluate on a missing dataset", lambda w: ["finetune", "evaluate", "--model", w["jobs"]["completed"],
                                                     "--dataset", "nope.jsonl"], "dataset nope.jsonl does not exist"),
        ("generate from a missing folder", lambda w: ["generate", "--model", "./no/such/folder", "--prompt", "hi"],
         "model folder ./no/such/folder does not exist"),
    ]


def _snapshot(root: Path) -> dict:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


CASES = _cases()


def test_the_battery_is_big_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name, argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(run_cli, world, _isolated_home, name, argv, message):
    before = _snapshot(_isolated_home)
    result = run_cli(*argv(world))
    assert result.exit_code == 1, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert _snapshot(_isolated_home) == before, "bad input must not create, change or remove anything"
