"""Faults and secrets: a full disk keeps earlier checkpoints, concurrent jobs stay apart, the HF token
never lands in a file, remote code is off unless asked and then said."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

from contract.job_folder import complete_checkpoints, read_job
from contract.strategy import parse_strategy
from orchestrator import jobs
from orchestrator.plan import make_plan

from conftest import DATASETS, ROOT


def _strategy(**training):
    return parse_strategy("t", {"fine_tuner": {"config": {
        "base_model": {"name": "spm", "huggingface_id": "builtin:tiny-llama-spm"},
        "method": {"type": "lora", "r": 4, "alpha": 8},
        "training_args": {"max_steps": 6, "per_device_train_batch_size": 2, "max_seq_length": 128,
                          "save_steps": 2, "save_total_limit": 5, "precision": "fp32", **training},
        "device": "cpu",
    }}})


def test_disk_full_during_a_checkpoint_fails_clearly_and_keeps_earlier_ones(monkeypatch, capsys):
    from trainer import saving
    from trainer.entrypoint import run

    real = saving._write_weights
    calls = {"n": 0}

    def fill_disk(model, tokenizer, text, tmp):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: write part of it, then the disk is full
            (tmp / "adapter_model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(model, tokenizer, text, tmp)

    monkeypatch.setattr(saving, "_write_weights", fill_disk)
    strategy = _strategy()
    folder = jobs.create("full", strategy, Path("t.yaml"), DATASETS / "medical_qa.jsonl", None, {}, make_plan(strategy, "local"))
    assert run(folder) == 1
    job = read_job(folder)
    assert job["status"] == "failed"
    assert job["error"] == (
        f"cannot write {folder}/checkpoints/checkpoint-4: No space left on device; earlier checkpoints are intact. "
        "Free disk space or fix the folder's permissions, then `llamafarm finetune resume`"
    )
    assert complete_checkpoints(folder) == [folder / "checkpoints" / "checkpoint-2"]
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["checkpoint-2"], "no half-written folder left"
    assert "Traceback" not in capsys.readouterr().out


def test_a_file_in_place_of_the_home_folder_is_a_clear_error(run_cli, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("LLAMAFARM_HOME", str(blocker))
    result = run_cli("run", "--strategy", "tiny_demo", "--dataset", DATASETS / "medical_qa.jsonl")
    assert result.exit_code == 1
    assert f"cannot create job folders in {blocker}/jobs" in result.output and "set LLAMAFARM_HOME" in result.output
    assert blocker.read_text() == "x"


def test_two_jobs_started_at_once_stay_apart_and_the_hf_token_is_never_written(tmp_path, _isolated_home):
    strategy = tmp_path / "s.yaml"
    strategy.write_text(json.dumps({"quick": {"fine_tuner": {"config": {
        "base_model": {"name": "spm", "huggingface_id": "builtin:tiny-llama-spm"},
        "training_args": {"max_steps": 2, "max_seq_length": 64}, "device": "cpu"}}}}))
    secret = "hf_secret_never_in_files_123"
    env = {**os.environ, "HF_TOKEN": secret, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "orchestrator.cli", "run", "--strategy", "quick", "--strategy-file", str(strategy),
            "--dataset", str(DATASETS / "medical_qa.jsonl"), "--foreground", "--json"]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    ids = [json.loads(out[out.index("{"):out.index("}") + 1])["job_id"] for out, _ in outs]
    assert ids[0] != ids[1]
    for job_id in ids:
        folder = _isolated_home / "jobs" / job_id
        assert read_job(folder)["status"] == "completed"
        assert read_job(folder)["job_id"] == job_id
    for path in _isolated_home.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"HF token written into {path}"


def test_trust_remote_code_is_off_by_default_and_said_when_on(capsys):
    from trainer.entrypoint import run

    assert _strategy().cfg.base_model.trust_remote_code is False
    strategy = parse_strategy("t", {"fine_tuner": {"config": {
        "base_model": {"name": "spm", "huggingface_id": "builtin:tiny-llama-spm", "trust_remote_code": True},
        "training_args": {"max_steps": 1, "max_seq_length": 64}, "device": "cpu"}}})
    folder = jobs.create("trc", strategy, Path("t.yaml"), DATASETS / "medical_qa.jsonl", None, {}, make_plan(strategy, "local"))
    assert run(folder) == 0
    assert "trust_remote_code: on (set in the strategy): the model repo's own code will run" in capsys.readouterr().out
