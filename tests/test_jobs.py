"""The job registry, the job folder contract, the local runner's launch spec, device decisions."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from contract.errors import UserError
from contract.job_folder import append_metrics, check_job_id, read_job, read_metrics, update_job
from contract.strategy import parse_strategy
from orchestrator import jobs
from orchestrator.runners import RUNNERS, choose_runner, get_runner
from orchestrator.runners.local import PROJECT_ROOT
from contract.decisions import choose_device
from orchestrator.plan import make_plan
from contract.plan import runner_of
from trainer.devices import choose_precision

STRATEGY = parse_strategy("t", {"fine_tuner": {"config": {"base_model": {"name": "t", "huggingface_id": "builtin:tiny-llama-spm"}}}})


def _job(tmp_path, name="tiny_demo"):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    return jobs.create(name, STRATEGY, Path("strategies/x.yaml"), data, None, {"x": 1}, make_plan(STRATEGY, "local"))


def test_create_writes_the_contract_files(tmp_path, _isolated_home):
    folder = _job(tmp_path)
    assert folder.parent == _isolated_home / "jobs"
    job = read_job(folder)
    assert job["status"] == "pending" and job["pid"] is None and runner_of(job) == "local"
    assert job["dataset"] == str(tmp_path / "d.jsonl") and job["overrides"] == {"x": 1}
    resolved = yaml.safe_load((folder / "strategy.yaml").read_text())
    assert parse_strategy("again", resolved) == STRATEGY, "the resolved strategy re-validates to the same settings"
    assert sorted(p.name for p in folder.iterdir()) == ["job.json", "strategy.yaml"]


def test_job_ids_are_distinct(tmp_path):
    ids = {_job(tmp_path).name for _ in range(20)}
    assert len(ids) == 20
    assert all(i.startswith("tiny_demo-") for i in ids)
    assert jobs.new_job_id("../../etc passwd").startswith("etc-passwd-")


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", "x" * 200, "a..b"])
def test_job_ids_cannot_leave_the_jobs_folder(bad):
    with pytest.raises(UserError, match="invalid job id"):
        check_job_id(bad)


def test_update_is_read_modify_write_and_metrics_append(tmp_path):
    folder = _job(tmp_path)
    update_job(folder, status="running", pid=123)
    update_job(folder, total_steps=10)
    job = read_job(folder)
    assert (job["status"], job["pid"], job["total_steps"], job["strategy"]) == ("running", 123, 10, "tiny_demo")
    append_metrics(folder, {"step": 1, "loss": 2.5})
    with open(folder / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # a line being written right now
    assert read_metrics(folder) == [{"step": 1, "loss": 2.5}]


def test_a_dead_process_is_marked_failed_not_left_running(tmp_path):
    folder = _job(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    update_job(folder, status="running", pid=proc.pid)
    job = jobs.refresh(folder)
    assert job["status"] == "failed"
    assert job["error"].startswith(f"the training process (pid {proc.pid}) ended without reporting a status")
    assert [j["status"] for j in jobs.list_jobs()] == ["failed"]


def test_a_live_process_stays_running(tmp_path):
    folder = _job(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        update_job(folder, status="running", pid=proc.pid)
        assert jobs.refresh(folder)["status"] == "running"
    finally:
        proc.kill()
        proc.wait()


def test_a_foreground_command_returns_once_the_jobs_process_has_ended(tmp_path, monkeypatch):
    """`--foreground` returns after the job's process is gone, not as soon as its status is final (the
    trainer shuts down after writing `completed`); one that never ends is waited for a bounded time."""
    from contract.job_folder import pid_alive
    from orchestrator.cli import jobs_cmd

    folder = _job(tmp_path)
    # Still running for a second after its status says completed, as a trainer's shutdown is.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    update_job(folder, status="completed", pid=proc.pid)
    said = []
    assert jobs_cmd.follow_in_foreground(folder, None, echo=said.append)["status"] == "completed"
    assert not pid_alive(proc.pid) and said == [f"job {folder.name} completed"]

    monkeypatch.setattr(jobs_cmd, "PROCESS_EXIT_SECONDS", 0.3)
    stays = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        update_job(folder, pid=stays.pid)
        start = time.monotonic()
        jobs_cmd.follow_in_foreground(folder, None, echo=said.append)
        assert time.monotonic() - start < 5 and pid_alive(stays.pid)
        assert said[-1] == (f"note: the job's process (pid {stays.pid}) is still running 0.3 s after the job ended; "
                            "not waiting for it any longer")
    finally:
        stays.kill()
        stays.wait()


def _watch(folder, child: str) -> subprocess.CompletedProcess:
    """The exit watch around a child Python program, as the local runner starts it (minus detaching)."""
    from orchestrator.runners.local import trainer_env, watched

    return subprocess.run(watched(folder, [sys.executable, "-c", child]), cwd=PROJECT_ROOT, env=trainer_env(),
                          capture_output=True, text=True, timeout=60)


def test_a_trainer_killed_outright_fails_with_what_killed_it(tmp_path):
    """SIGKILL (the kernel's out-of-memory killer) cannot be caught: the exit watch writes the status."""
    folder = _job(tmp_path)
    update_job(folder, status="running", pid=123)
    proc = _watch(folder, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    job = read_job(folder)
    assert proc.returncode == 128 + 9 and job["status"] == "failed" and job["finished_at"]
    assert job["error"] == (f"the training process ended with exit code -9: killed (SIGKILL), most often by the "
                            "system for running out of memory: lower per_device_train_batch_size or max_seq_length, "
                            f"or turn on gradient_checkpointing; see {folder / 'train.log'}")
    assert job["pid"] == 123, "the job's pid stays the one the runner recorded"
    assert jobs.refresh(folder)["error"] == job["error"]


def test_the_exit_watch_keeps_a_status_the_trainer_wrote(tmp_path):
    folder = _job(tmp_path)
    child = ("import os; from contract.job_folder import update_job; "
             f"update_job({str(folder)!r}, status='completed', supervised=os.environ['LLAMAFARM_SUPERVISED'])")
    proc = _watch(folder, child)
    job = read_job(folder)
    assert proc.returncode == 0, proc.stderr
    assert (job["status"], job.get("error"), job["supervised"]) == ("completed", None, "1")
    other = _job(tmp_path)
    proc = _watch(other, "raise SystemExit(4)")
    assert proc.returncode == 4 and read_job(other)["error"].startswith(
        "the training process ended with exit code 4: ended without reporting a status; see ")


def test_the_exit_watch_leaves_a_resumed_job_to_its_next_run(tmp_path):
    """A resume may start the next run before the last one's watch has looked: that watch writes nothing."""
    folder = _job(tmp_path)
    proc = _watch(folder, f"from contract.job_folder import update_job; update_job({str(folder)!r}, "
                          "status='pending', resumes=1); raise SystemExit(9)")
    job = read_job(folder)
    assert proc.returncode == 9 and (job["status"], job.get("error")) == ("pending", None)


def test_a_stop_that_ends_the_trainer_without_a_status_leaves_it_stopped(tmp_path):
    """LocalRunner.stop signals the process group; the watch notes it and passes nothing on."""
    from orchestrator.runners.base import LaunchSpec
    from orchestrator.runners.local import LocalRunner, trainer_env, watched

    folder = _job(tmp_path)
    ready = tmp_path / "ready"
    child = (f"import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
             f"open({str(ready)!r}, 'w').close(); time.sleep(60)")
    runner = LocalRunner()
    pid = runner.start(LaunchSpec(argv=watched(folder, [sys.executable, "-c", child]), cwd=PROJECT_ROOT,
                                  env=trainer_env(), log_path=folder / "train.log"))
    update_job(folder, status="running", pid=pid)
    deadline = time.time() + 30
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    runner.stop(read_job(folder))
    while read_job(folder)["status"] == "running" and time.time() < deadline:
        time.sleep(0.05)
    job = read_job(folder)
    assert (job["status"], job.get("error")) == ("stopped", None), (folder / "train.log").read_text()


def test_model_folder_resolution(tmp_path):
    folder = _job(tmp_path)
    with pytest.raises(UserError, match=f"job {folder.name} is pending; only a completed job has final weights"):
        jobs.model_folder(folder.name)
    with pytest.raises(UserError, match="no job with id 'nope'"):
        jobs.model_folder("nope")
    with pytest.raises(UserError, match="holds no trained model"):
        jobs.model_folder(str(tmp_path))
    (folder / "final").mkdir()
    (folder / "final" / "strategy.yaml").write_text("x")
    update_job(folder, status="completed")
    assert jobs.model_folder(folder.name) == folder / "final"
    assert jobs.model_folder(str(folder)) == folder / "final"
    assert jobs.model_folder(str(folder / "final")) == folder / "final"


def test_local_runner_launch_spec(tmp_path):
    spec = get_runner("local").launch_spec(tmp_path / "job")
    assert spec.argv == [sys.executable, "-m", "orchestrator.runners.exit_watch", str(tmp_path / "job"), "--",
                         sys.executable, "-m", "trainer", "train", str(tmp_path / "job")]
    assert spec.cwd == PROJECT_ROOT and spec.log_path == tmp_path / "job" / "train.log"
    assert spec.env["PYTHONPATH"].split(":")[0] == str(PROJECT_ROOT) and spec.env["PYTHONUNBUFFERED"] == "1"


def test_runner_registry_and_choice():
    assert list(RUNNERS)[:3] == ["local", "container", "native"]
    with pytest.raises(UserError, match=f"unknown runner 'docker'; valid: {', '.join(RUNNERS)}"):
        get_runner("docker")
    assert choose_runner(None, "auto")[0].name == "local"
    assert choose_runner("local", "auto")[1] == "--runner flag"
    assert choose_runner(None, "local")[1] == "set in the strategy"


def test_device_choice_and_fallback():
    none = {"cuda": False, "mps": False, "cpu": True}
    assert choose_device("auto", None, none).value == "cpu"
    assert choose_device("auto", None, {**none, "mps": True}).value == "mps"
    assert choose_device("auto", None, {"cuda": True, "mps": True, "cpu": True}).value == "cuda"
    fell = choose_device("mps", "cpu", none)
    assert (fell.value, fell.reason) == ("cpu", "mps was asked for but is not available; strategy falls back to cpu")
    with pytest.raises(UserError, match="device 'cuda' is not available on this machine"):
        choose_device("cuda", None, none)


def test_cpu_precision_follows_the_measured_rates():
    """auto takes the dtype measured faster on the model's shape, whatever the CPU's flags say (an
    AVX512-BF16 Xeon without AMX runs bf16 at half its fp32 rate); the numbers are in the reason."""
    from contract.decisions import choose_cpu_precision

    xeon = {"fp32": 320.0, "bf16": 170.0, "shape": "512x576x1536"}
    amx = {"fp32": 300.0, "bf16": 1200.0, "shape": "512x576x1536"}
    slow = choose_cpu_precision("auto", xeon)
    assert slow.value == "fp32"
    assert slow.reason == ("measured on this CPU on the model's 512x576x1536 matmul: bf16 170.0 GFLOP/s, "
                           "fp32 320.0 GFLOP/s")
    assert choose_cpu_precision("auto", amx).value == "bf16"
    assert choose_precision("bf16", "cpu").reason == "set in the strategy"
    with pytest.raises(UserError, match="fp16 is not supported for CPU training"):
        choose_precision("fp16", "cpu")
    with pytest.raises(UserError, match="bf16 is not reliable on MPS"):
        choose_precision("bf16", "mps")


def test_the_precision_probe_measures_once_per_machine_and_shape(tmp_path, monkeypatch):
    """The trainer measures both dtypes on the model's own product and caches them; the host's estimate
    reads the same numbers (it would otherwise start the trainer to measure)."""
    from types import SimpleNamespace

    from contract import precision_probe
    from orchestrator.estimate import throughput
    from trainer import devices

    monkeypatch.setenv("LLAMAFARM_CACHE", str(tmp_path))
    monkeypatch.setattr(devices, "core_wait_share", lambda before: 0.0)  # a quiet machine, whatever this one is
    config = SimpleNamespace(hidden_size=64, intermediate_size=96)
    decision = choose_precision("auto", "cpu", config)
    rates = precision_probe.cached_rates((512, 64, 96))
    assert rates["shape"] == "512x64x96" and rates["fp32"] > 0 and rates["bf16"] > 0
    assert decision.value == ("bf16" if rates["bf16"] > rates["fp32"] else "fp32") and "512x64x96" in decision.reason
    monkeypatch.setattr(devices, "store_rates", lambda *a: pytest.fail("measured again"))
    assert devices.precision_rates((512, 64, 96)) == rates
    from orchestrator.runners import local

    monkeypatch.setattr(local, "run_trainer", lambda *a: pytest.fail("the host measured again"))
    assert throughput.precision_rates(64, 96) == rates


def test_a_probe_taken_while_another_program_holds_the_cores_is_used_once_not_kept(tmp_path, monkeypatch):
    """A precision measurement the scheduler says waited for the cores decides this run (its reason says
    so) and is measured again next time; the same rule keeps no compile measurement."""
    from types import SimpleNamespace

    from contract import machine_cache, precision_probe
    from trainer import devices

    monkeypatch.setenv("LLAMAFARM_CACHE", str(tmp_path))
    monkeypatch.setattr(devices, "core_wait_share", lambda before: 0.6)
    decision = choose_precision("auto", "cpu", SimpleNamespace(hidden_size=64, intermediate_size=96))
    assert decision.reason.endswith("; measured while another program held the cores (60% of the probe "
                                    "waiting), so not kept")
    assert precision_probe.cached_rates((512, 64, 96)) is None
    assert not machine_cache.store("compile_probe", "k", {"gain": 0.1}, contention=0.6)
    assert machine_cache.cached("compile_probe", "k") is None
    assert machine_cache.store("compile_probe", "k", {"gain": 0.1}, contention=0.0)
    assert machine_cache.cached("compile_probe", "k") == {"gain": 0.1}
    assert machine_cache.store("compile_probe", "j", {"gain": 0.1})  # no scheduler numbers (not Linux): kept
    # The layer kernel's and the attention segments' measurements: the first job measures, later ones read.
    assert machine_cache.kept_or_measured("layer_kernel", "m", lambda: {"ms": 1.0}) == ({"ms": 1.0}, False)
    assert machine_cache.kept_or_measured("layer_kernel", "m", lambda: pytest.fail("measured again")) == ({"ms": 1.0}, True)


def test_qlora_is_refused_or_falls_back_off_cuda():
    from contract.strategy import MethodSpec
    from contract.decisions import choose_method

    with pytest.raises(UserError, match=r"method qlora needs a CUDA device \(training on cpu\)"):
        choose_method(MethodSpec(type="qlora"), "cpu")
    fell = choose_method(MethodSpec(type="qlora", fallback_to_lora=True), "cpu")
    assert fell.value == "lora" and "fallback_to_lora is on" in fell.reason
    assert json.dumps(fell.__dict__)


@pytest.mark.parametrize("eval_row, shown", [
    ({"eval_loss": 0.6, "eval_reward_accuracy": 0.75, "eval_reward_margin": 0.5}, "(eval 0.75, margin 0.50)"),
    # KTO judges single answers: an accuracy without a margin (this crashed `start --foreground`).
    ({"eval_loss": 0.6, "eval_reward_accuracy": 0.75}, "(eval 0.75)"),
])
def test_monitor_shows_preference_evaluation_with_or_without_a_margin(eval_row, shown):
    from orchestrator.monitor import render, summary

    job = {"job_id": "j", "status": "completed", "total_steps": 4}
    train = {"step": 4, "loss": 0.5, "elapsed": 2.0, "reward_accuracy": 0.5}
    assert shown in render(summary(job, [train, {"step": 4, **eval_row}]))
