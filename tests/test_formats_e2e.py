"""Every dataset format and file type trains end to end (in-process, through the real entrypoint);
the tokenized cache, eval files, `dataset validate` and `evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contract.errors import DatasetError
from contract.job_folder import read_job, read_metrics
from contract.strategy import parse_strategy
from orchestrator import jobs
from orchestrator.plan import make_plan
from inputs.data.records import read_dataset

from conftest import DATASETS

pytestmark = pytest.mark.slow  # trains, exports or evaluates real jobs

QA = [json.loads(line) for line in (DATASETS / "medical_qa.jsonl").read_text().splitlines()[:12]]


def _strategy(**dataset):
    return parse_strategy("t", {"fine_tuner": {"config": {
        "base_model": {"name": "spm", "huggingface_id": "builtin:tiny-llama-spm"},
        "method": {"type": "lora", "r": 4, "alpha": 8},
        "training_args": {"max_steps": 2, "per_device_train_batch_size": 2, "max_seq_length": 128,
                          "learning_rate": 1e-3, "precision": "fp32"},
        "dataset": dataset,
        "device": "cpu",
    }}})


def _train(path: Path, eval_path: Path | None = None, **dataset) -> Path:
    from trainer.entrypoint import run

    strategy = _strategy(**dataset)
    folder = jobs.create("fmt", strategy, Path("t.yaml"), path, eval_path, {}, make_plan(strategy, "local"))
    assert run(folder) == 0, (folder / "train.log").read_text() if (folder / "train.log").exists() else read_job(folder)
    return folder


def _csv(tmp_path):
    import csv

    path = tmp_path / "qa.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "context", "answer"])
        for row in QA:
            w.writerow([row["instruction"], row["input"], row["output"]])
    return path


def _sharegpt_json(tmp_path):
    path = tmp_path / "chats.json"
    rows = [{"conversations": [{"from": "human", "value": r["instruction"]}, {"from": "gpt", "value": r["output"]}]}
            for r in QA]
    path.write_text(json.dumps(rows, indent=1))
    return path


def _parquet(tmp_path):
    import datasets

    path = tmp_path / "pc.parquet"
    datasets.Dataset.from_list([{"prompt": r["instruction"], "completion": r["output"]} for r in QA]).to_parquet(str(path))
    return path


def _hf_folder(tmp_path):
    import datasets

    path = tmp_path / "text_ds"
    datasets.Dataset.from_list([{"text": f"{r['instruction']} {r['output']}"} for r in QA]).save_to_disk(str(path))
    return path


@pytest.mark.parametrize(
    "make, fmt, settings",
    [
        (_csv, "alpaca", {"columns": {"instruction": "question", "input": "context", "output": "answer"}}),
        (lambda tmp: DATASETS / "medical_chat.jsonl", "chat", {}),
        (_sharegpt_json, "sharegpt", {}),
        (_parquet, "prompt_completion", {}),
        (_hf_folder, "text", {}),
    ],
    ids=["alpaca-csv-columns", "chat-jsonl", "sharegpt-json", "prompt_completion-parquet", "text-hf_folder"],
)
def test_each_format_trains(tmp_path, make, fmt, settings):
    path = make(tmp_path)
    rows = read_dataset(path, "auto", settings.get("columns"))
    assert {r.format for r in rows} == {fmt}
    folder = _train(path, **settings)
    job = read_job(folder)
    assert job["status"] == "completed" and job["data"]["rows"] == len(rows)
    assert [m["step"] for m in read_metrics(folder)] == [1, 2]
    assert (folder / "final" / "adapter_model.safetensors").exists()


def test_text_rows_train_on_every_token(tokenizers):
    from contract.chat_templates import get_template
    from trainer.data.tokenize import ConversationEncoder

    tok = tokenizers["tiny-llama-spm"]
    ids, labels = ConversationEncoder(tok, get_template("alpaca"), 64, False, "truncate").encode_text("Rest helps.")
    assert ids == labels and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


def test_missing_mapped_column_names_the_row(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("question,reply\nWhat is flu?,A virus.\n")
    with pytest.raises(DatasetError, match=r"bad\.csv:2: column 'answer' \(from dataset\.columns\) is missing"):
        read_dataset(path, "auto", {"instruction": "question", "output": "answer"})


def test_unknown_file_type_and_plain_folder(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DatasetError, match=r"unknown file type '\.txt'"):
        read_dataset(tmp_path / "x.txt")
    with pytest.raises(DatasetError, match="is a folder but not a saved Hugging Face dataset"):
        read_dataset(tmp_path)


def test_tokenized_rows_are_cached_and_an_eval_file_is_used(tmp_path):
    first = _train(DATASETS / "medical_qa.jsonl", DATASETS / "medical_qa_eval.jsonl")
    second = _train(DATASETS / "medical_qa.jsonl", DATASETS / "medical_qa_eval.jsonl")
    a, b = read_job(first)["data"], read_job(second)["data"]
    assert (a["cache_hit"], b["cache_hit"]) == (False, True)
    assert a["eval"] == b["eval"] == 30 and a["train"] == b["train"] == 200
    evals = [m for m in read_metrics(second) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [2], "no eval_steps: eval at each epoch end and at the last step"
    third = _train(DATASETS / "medical_qa.jsonl", DATASETS / "medical_qa_eval.jsonl", truncation="drop")
    assert read_job(third)["data"]["cache_hit"] is False, "a different length setting is a different cache key"


def test_dataset_validate_cli(run_cli, write_jsonl):
    result = run_cli("finetune", "dataset", "validate", DATASETS / "medical_chat.jsonl", "--strategy", "tiny_demo", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["rows"], report["format"], report["multi_turn_rows"], report["duplicates"]) == (40, "chat", 10, 0)
    # Golden token counts under tiny_demo's byte-level BPE builtin and its Llama 3 template.
    tokens = {k: report[k] for k in ("tokens_p50", "tokens_p95", "tokens_max", "over_max_seq_length",
                                     "tokens_per_epoch", "target_tokens")}
    assert tokens == {"tokens_p50": 144, "tokens_p95": 244, "tokens_max": 257, "over_max_seq_length": 1,
                      "tokens_per_epoch": 6333, "target_tokens": 4115}  # in the loss after the cut (#18)
    assert report["template"] == "model" and report["over_action"] == "truncate"
    dup = write_jsonl([QA[0], QA[1], QA[0]], "dup.jsonl")
    text = run_cli("finetune", "dataset", "validate", dup).output
    assert "3 rows, alpaca format" in text and "duplicate rows 1" in text and f"{dup}:3 repeats {dup}:1" in text
    bad = write_jsonl([QA[0], {"instruction": "x"}], "bad.jsonl")
    result = run_cli("finetune", "dataset", "validate", bad)
    assert result.exit_code == 1 and f"{bad}:2: alpaca row is missing 'output'" in result.output
