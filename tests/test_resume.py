"""Reproducibility: two runs with one seed are bitwise identical, and so is a run SIGKILLed at a random
step and then resumed from its newest complete checkpoint."""

from __future__ import annotations

import hashlib
import json
import random
import re
import signal
import time
from pathlib import Path

import psutil
import pytest
import yaml

from contract.job_folder import complete_checkpoints, read_job, read_metrics
from orchestrator import jobs

from conftest import DATASETS

pytestmark = pytest.mark.slow  # trains, exports or evaluates real jobs

STRATEGY = {
    "repro": {
        "fine_tuner": {
            "config": {
                "base_model": {"name": "spm", "huggingface_id": "builtin:tiny-llama-spm"},
                # Dropout on: resuming must restore the RNG, not only the weights.
                "method": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.1,
                           "target_modules": ["q_proj", "v_proj", "down_proj"]},
                # 60 steps (~3 s here) so the kill at step 3-9 lands with 50+ steps to spare on any machine.
                "training_args": {"max_steps": 60, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                                  "learning_rate": 2e-3, "lr_scheduler_type": "cosine", "warmup_ratio": 0.1,
                                  "max_seq_length": 128, "save_steps": 2, "save_total_limit": 3, "seed": 3,
                                  "precision": "fp32"},
                "device": "cpu",
            }
        }
    }
}


def _weights_digest(folder: Path) -> str:
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].tobytes())
    return h.hexdigest()


def _wait_until(condition, folder: Path, timeout: float = 180) -> None:
    """Poll `condition` until true; fail with the job's log instead of hanging."""
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            log = (folder / "train.log").read_text() if (folder / "train.log").exists() else ""
            raise AssertionError(f"timed out after {timeout}s; job: {read_job(folder)}\n{log}")
        time.sleep(0.1)


def _start(run_cli, strategy_file, *extra) -> Path:
    result = run_cli("run", "--strategy", "repro", "--strategy-file", strategy_file,
                     "--dataset", DATASETS / "medical_qa.jsonl", "--json", *extra)
    assert result.exit_code == 0, result.output
    return Path(json.loads(result.stdout[result.stdout.index("{"):])["job_dir"])


def test_kill_and_resume_is_bitwise_identical_to_an_uninterrupted_run(run_cli, tmp_path, monkeypatch):
    # Every run at one thread count, as the guarantee says: the trainer's probe drops to one thread when
    # other programs hold the cores, which a busy machine would make differ between the fresh runs.
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    strategy_file = tmp_path / "repro.yaml"
    strategy_file.write_text(yaml.safe_dump(STRATEGY))

    first = _start(run_cli, strategy_file, "--foreground")
    second = _start(run_cli, strategy_file, "--foreground")
    reference = _weights_digest(first / "final")
    assert read_job(first)["status"] == read_job(second)["status"] == "completed"
    assert _weights_digest(second / "final") == reference, "same strategy and seed, same weights"

    kill_at = random.Random().randint(3, 9)
    killed = _start(run_cli, strategy_file)
    deadline = time.time() + 120
    while time.time() < deadline:
        steps = [m["step"] for m in read_metrics(killed) if "loss" in m]
        if steps and steps[-1] >= kill_at:
            break
        time.sleep(0.05)
    # The trainer alone, as the kernel's out-of-memory killer would: the exit watch around it says so.
    (trainer,) = psutil.Process(read_job(killed)["pid"]).children()
    trainer.send_signal(signal.SIGKILL)
    _wait_until(lambda: jobs.refresh(killed)["status"] != "running", killed)
    job = read_job(killed)
    assert job["status"] == "failed" and "exit code -9: killed (SIGKILL)" in job["error"], job
    assert not (killed / "final").exists()
    newest = complete_checkpoints(killed)[-1]

    result = run_cli("finetune", "resume", "--job-id", killed.name, "--foreground")
    assert result.exit_code == 0, (killed / "train.log").read_text()
    assert f"resumes from {newest.name}" in result.output
    job = read_job(killed)
    assert (job["status"], job["resumes"], job["resume_from"]) == ("completed", 1, f"checkpoints/{newest.name}")
    assert _weights_digest(killed / "final") == reference, f"killed at step >= {kill_at}, resumed from {newest.name}"
    steps = [m["step"] for m in read_metrics(killed) if "loss" in m]
    max_steps = STRATEGY["repro"]["fine_tuner"]["config"]["training_args"]["max_steps"]
    assert steps == list(range(1, max_steps + 1)), "metrics cut back to the checkpoint, then continued"
    elapsed = [m["elapsed"] for m in read_metrics(killed) if "loss" in m]
    assert elapsed == sorted(elapsed), "elapsed runs on across the resume, never back to 0:00:00"
    log = (killed / "train.log").read_text()
    assert f"resume: from {newest.name}" in log
    assert "threads: 2 (kept from the run this resumes" in log
    assert "lora dropout: kernel (kept from the run this resumes" in log, \
        "dropout 0.1 on CPU: the kernel's masks (seeded from torch's generator) resume bitwise too"
    # Measured, so either value; kept, so the resumed steps compute the layers as the killed run did.
    assert re.search(r"layer kernel: (kernel|torch) \(kept from the run this resumes", log)


def test_stop_then_resume_completes(run_cli, tmp_path):
    strategy_file = tmp_path / "repro.yaml"
    strategy_file.write_text(yaml.safe_dump(STRATEGY))
    folder = _start(run_cli, strategy_file, "--set", "training_args.max_steps=400")
    _wait_until(lambda: read_metrics(folder), folder)
    assert run_cli("finetune", "stop", "--job-id", folder.name).exit_code == 0
    _wait_until(lambda: jobs.refresh(folder)["status"] != "running", folder)
    assert read_job(folder)["status"] == "stopped"
    stopped_at = json.loads((complete_checkpoints(folder)[-1] / "trainer_state.json").read_text())["step"]
    # Ask it to stop again right after the resume, so the test stays short; it continued from stopped_at.
    result = run_cli("finetune", "resume", "--job-id", folder.name)
    assert result.exit_code == 0
    def resumed_and_stepping() -> bool:
        assert jobs.refresh(folder)["status"] in ("pending", "running"), (folder / "train.log").read_text()
        return any(m.get("step", 0) > stopped_at for m in read_metrics(folder))

    _wait_until(resumed_and_stepping, folder)
    run_cli("finetune", "stop", "--job-id", folder.name)
    _wait_until(lambda: jobs.refresh(folder)["status"] not in ("pending", "running"), folder)
    assert read_job(folder)["status"] == "stopped" and read_job(folder)["resumes"] == 1


def test_a_resumed_run_keeps_the_decisions_that_change_its_arithmetic():
    """A resumed run takes the recorded decision of the run it resumes (the entrypoint asks this for the
    threads, a measured precision, the compile and the attention softmax), whatever the machine would
    decide now; a resume of a resume quotes the first run's reason once; a fresh run keeps nothing. The thread count is applied,
    not only recorded."""
    import torch

    from contract.decisions import Decision
    from trainer import performance
    from trainer.entrypoint import _Job

    earlier = {"threads": {"value": "1", "reason": "the 2 cores are busy: ..."}}
    resumed = _Job(Path("."), "", None, {"resume_from": "checkpoints/checkpoint-4", "decisions": earlier},
                   Decision("cpu", ""), Decision("lora", ""), None)
    kept = resumed.kept_on_resume("threads")
    assert kept.value == "1" and kept.reason.startswith("kept from the run this resumes, so the resumed steps")
    assert kept.reason.endswith("(there: the 2 cores are busy: ...)")
    again = _Job(Path("."), "", None, {"resume_from": "checkpoints/checkpoint-8",
                                       "decisions": {"threads": kept.__dict__}},
                 Decision("cpu", ""), Decision("lora", ""), None)
    assert again.kept_on_resume("threads") == kept
    assert resumed.kept_on_resume("compile") is None and resumed.kept_on_resume("attention_softmax") is None
    fresh = _Job(Path("."), "", None, {"decisions": earlier}, Decision("cpu", ""), Decision("lora", ""), None)
    assert fresh.kept_on_resume("threads") is None
    assert resumed.keep_or_decide("threads", lambda: pytest.fail("decided again on a resume")) == kept
    assert resumed.keep_or_decide("precision", lambda: Decision("fp32", "measured")).reason == "measured"
    assert fresh.keep_or_decide("threads", lambda: Decision("2", "probe")).value == "2"
    assert resumed.keep_or_decide("threads", lambda: Decision("2", "probe"), applies=False).value == "2"
    before = torch.get_num_threads()
    try:
        assert performance.use_threads(kept) == kept and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name, recorded", [
    ("threads", {"value": "two", "reason": "hand-edited"}),
    ("threads", {"value": "0", "reason": "hand-edited"}),
    ("precision", {"value": "fp8", "reason": "hand-edited"}),
    ("compile", {"value": "on"}),
    ("compile", "on"),
    ("attention_softmax", {"value": "c++", "reason": "hand-edited"}),
    ("attention_segments", {"value": "1.5k", "reason": "hand-edited"}),
    ("sequence_kernel", {"value": "ours", "reason": "hand-edited"}),
    ("threads", None),  # the whole `decisions` replaced by a list, below
])
def test_a_resume_refuses_a_hand_edited_decision_it_would_keep_saying_where_and_what_to_do(name, recorded):
    """A recorded decision the resumed run could not compute with stops it with the file, the field and
    the values it takes (a non-numeric thread count used to end in a traceback)."""
    from contract.decisions import Decision
    from contract.job_folder import UnreadableJob
    from trainer.entrypoint import _Job

    decisions = {name: recorded} if recorded is not None else ["threads", "2"]
    job = {"resume_from": "checkpoints/checkpoint-4", "decisions": decisions}
    run = _Job(Path("/jobs/j1"), "", None, job, Decision("cpu", ""), Decision("lora", ""), None)
    with pytest.raises(UnreadableJob) as raised:
        run.keep_or_decide(name, lambda: pytest.fail("decided again over a bad record"))
    message = str(raised.value)
    where = f"decisions.{name}" if recorded is not None else "decisions"
    assert message.startswith(f"job file /jobs/j1/job.json: {where} is ")
    assert "restore what it recorded, or start the strategy again as a new job" in message
