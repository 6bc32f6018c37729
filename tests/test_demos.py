"""Both demos run end to end on the builtin tiny models (a few steps each), from another working
folder, as a user runs them; a failed step makes a demo exit non-zero."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.slow  # trains, exports or evaluates real jobs


def _run_demo(name: str, cwd, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    # The test's LLAMAFARM_HOME, the shared builtin cache and the local runner come from conftest's env.
    return subprocess.run([sys.executable, str(ROOT / "demos" / name), *args], cwd=cwd, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def _jobs(home):
    return {p.name: json.loads((p / "job.json").read_text()) for p in sorted((home / "jobs").iterdir())}


def test_demo3_quick_training(tmp_path, _isolated_home):
    proc = _run_demo("demo3_quick_training.py", tmp_path, "--steps", "3")
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    # This machine has no GPU and no cached TinyLlama: the demo says so and falls back.
    assert "strategy: cpu_fine_tuning (no GPU)" in out and "cpu_fine_tuning cannot run offline here" in out
    (job_id, job), = _jobs(_isolated_home).items()
    assert job["status"] == "completed" and job["strategy"] == "tiny_demo"
    assert f"job: {job_id}" in out and "trained 3 steps in" in out
    evaluation = json.loads((_isolated_home / "jobs" / job_id / "evaluation.json").read_text())
    assert f"loss {evaluation['base']['loss']:.4f} (base) -> {evaluation['fine_tuned']['loss']:.4f}" in out
    exports = _isolated_home / "jobs" / job_id / "exports"
    (ollama,) = exports.iterdir()
    assert (ollama / "Modelfile").is_file() and (ollama / "model.gguf").is_file()
    assert "=== 9. generate from the exported GGUF ===" in out and out.rstrip().endswith("demo finished: every step passed")


def test_demo4_advanced_two_sft_stages_then_dpo(tmp_path, _isolated_home):
    proc = _run_demo("demo4_advanced_finetuning.py", tmp_path, "--steps", "2")
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    jobs = _jobs(_isolated_home)
    stage1, stage2, stage3 = (next(j for j in jobs.values() if j["strategy"] == s)
                              for s in ("demo4_stage1_general", "demo4_stage2_code", "demo4_stage3_dpo"))
    assert stage1["status"] == stage2["status"] == stage3["status"] == "completed"
    for earlier, later in ((stage1, stage2), (stage2, stage3)):
        assert later["overrides"]["fine_tuner.config.base_model.huggingface_id"] == f"job:{earlier['job_id']}"
        used = yaml.safe_load((_isolated_home / "jobs" / later["job_id"] / "strategy.yaml").read_text())
        base = used["fine_tuner"]["config"]["base_model"]["huggingface_id"]
        assert f"/merged/{earlier['job_id']}-" in base, "the earlier stage's LoRA output, merged, is the next base"
    assert "8 held-out prompts: loss" in out and "(stage 1) ->" in out
    # Stage 3 (DPO on an SFT job) is evaluated against stage 2 on held-out pairs, then exported and verified.
    evaluation = json.loads((_isolated_home / "jobs" / stage3["job_id"] / "evaluation.json").read_text())
    assert evaluation["data"] == "pairs" and evaluation["rows"] == 40 and evaluation["preference"]["stage"] == "dpo"
    assert f"40 held-out pairs: chosen answer more likely in {evaluation['base']['preference_accuracy']:.0%} (stage 2)" in out
    exports = _isolated_home / "jobs" / stage3["job_id"] / "exports"
    assert sorted(p.name for p in exports.iterdir()) == ["gguf-q8_0", "ollama-q8_0"]
    for export in exports.iterdir():
        assert json.loads((export / "export_report.json").read_text())["verification"]["passed"]
    assert "=== 8. generate from the GGUF ===" in out and out.rstrip().endswith("demo finished: every step passed")


def test_a_failed_step_stops_the_demo_with_exit_1(tmp_path):
    proc = _run_demo("demo3_quick_training.py", tmp_path, "--strategy", "tiny_demo", "--dataset", "missing.jsonl",
                     timeout=120)
    assert proc.returncode == 1
    assert "demo stopped: step failed (exit 1): llamafarm finetune dataset validate" in proc.stderr
