"""The container runner: its launch spec for the CPU and CUDA images (pure, no engine needed), its
refusals before a job exists, the auto rules, and real runs of tiny_demo in the CPU image through the
machine's engine (scripts/container_setup.sh sets up Podman and builds the image; scripts/test.sh
runs it first)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from contract.errors import UserError
from contract.job_folder import pid_alive, read_job, read_metrics
from orchestrator import images, strategies
from orchestrator.images import IMAGES, version
from orchestrator.runners import RUNNERS, choose_runner, engine
from orchestrator.runners.container import ContainerRunner, ContainerSpec, HostFacts, container_spec, image_for
from contract.decisions import Decision
from contract.plan import JobPlan, runner_of

ROOT = Path(__file__).resolve().parent.parent
QA = ROOT / "demos" / "datasets" / "medical_qa.jsonl"
HOST = HostFacts(uid=1234, gid=5678, llamafarm_home=Path("/home/u/.llamafarm"),
                 llamafarm_cache=Path("/home/u/.cache/llamafarm"), hf_home=None, engine_url="unix:///run/podman/podman.sock")


def _cfg(name: str, **overrides):
    entry, _ = strategies.get(name, ())
    raw, _ = strategies.apply_overrides(entry.raw, tuple(f"{k}={v}" for k, v in overrides.items()))
    return strategies.validate(name, raw, name).cfg


def test_cpu_launch_spec(tmp_path):
    job_dir = tmp_path / "tiny_demo-1"
    job = {"dataset": "/data/qa.jsonl", "eval_dataset": "/data/eval.jsonl"}
    spec = container_spec(job_dir, job, _cfg("tiny_demo"), "cpu", HOST)
    assert spec.image == f"llamafarm-cpu:{version()}" == IMAGES["cpu"].tag
    assert spec.name == "llamafarm-tiny_demo-1"
    assert spec.command == ["train", str(job_dir)]
    assert spec.user == "1234:5678"
    assert spec.mounts == [
        {"source": str(job_dir), "target": str(job_dir), "read_only": False},
        {"source": "/home/u/.llamafarm/cache", "target": "/home/u/.llamafarm/cache", "read_only": False},
        {"source": "/home/u/.cache/llamafarm", "target": "/cache/llamafarm", "read_only": False},
        {"source": "/data/qa.jsonl", "target": "/data/qa.jsonl", "read_only": True},
        {"source": "/data/eval.jsonl", "target": "/data/eval.jsonl", "read_only": True},
    ]
    assert spec.environment == {"PYTHONUNBUFFERED": "1", "LLAMAFARM_SUPERVISED": "1",
                                "LLAMAFARM_CACHE": "/cache/llamafarm", "LLAMAFARM_HOME": "/home/u/.llamafarm"}
    assert spec.ulimits == [{"name": "nofile", "soft": 1024, "hard": 4096},
                            {"name": "nproc", "soft": 4096, "hard": 4096}]
    assert spec.device_requests == [] and spec.ipc_mode is None and spec.shm_size == "2g"
    assert ContainerSpec.from_json(spec.to_json()) == spec


def test_cuda_launch_spec_asks_for_gpus_host_ipc_and_nvidia_limits(tmp_path):
    hf = tmp_path / "hf"
    host = HostFacts(**{**HOST.__dict__, "hf_home": hf})
    model = tmp_path / "my-model"
    cfg = _cfg("cuda_fine_tuning", **{"base_model.huggingface_id": str(model)})
    spec = container_spec(tmp_path / "job", {"dataset": "/d.jsonl"}, cfg, "cuda", host)
    assert spec.image == IMAGES["cuda"].tag
    assert spec.device_requests == [{"count": -1, "capabilities": [["gpu"]]}]
    assert spec.ipc_mode == "host" and spec.shm_size is None
    assert {u["name"]: (u["soft"], u["hard"]) for u in spec.ulimits} == {
        "nofile": (1024, 4096), "memlock": (-1, -1), "stack": (67108864, 67108864)}
    assert {"source": str(hf), "target": "/cache/huggingface", "read_only": False} in spec.mounts
    assert {"source": str(model), "target": str(model), "read_only": True} in spec.mounts  # a local base model
    assert spec.environment["HF_HOME"] == "/cache/huggingface"

    listed = container_spec(tmp_path / "job", {"dataset": "/d.jsonl"},
                            _cfg("cuda_fine_tuning", **{"container.gpus": "[0, GPU-5ac]"}), "cuda", host)
    assert listed.device_requests == [{"device_ids": ["0", "GPU-5ac"], "capabilities": [["gpu"]]}]
    # A cuda strategy that fell back to the CPU gets the CPU image and no GPU.
    fell_back = container_spec(tmp_path / "job", {"dataset": "/d.jsonl"}, cfg, "cpu", host)
    assert fell_back.image == IMAGES["cpu"].tag and fell_back.device_requests == []


def test_sdk_arguments_pass_secrets_only_when_set(tmp_path):
    from docker.types import DeviceRequest, Mount, Ulimit

    spec = container_spec(tmp_path / "job", {"dataset": "/d.jsonl"}, _cfg("cuda_fine_tuning"), "cuda", HOST)
    kwargs = spec.create_kwargs({"HF_TOKEN": "hf_secret", "HF_ENDPOINT": "", "PATH": "/bin"})
    assert kwargs["environment"]["HF_TOKEN"] == "hf_secret"
    assert "HF_ENDPOINT" not in kwargs["environment"] and "PATH" not in kwargs["environment"]
    assert "hf_secret" not in spec.to_json()  # the supervisor's argv holds names, never values
    assert kwargs["device_requests"] == [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    assert kwargs["mounts"][0] == Mount(target=str(tmp_path / "job"), source=str(tmp_path / "job"), type="bind",
                                        read_only=False)
    assert Ulimit(name="memlock", soft=-1, hard=-1) in kwargs["ulimits"]
    assert kwargs["ipc_mode"] == "host" and "shm_size" not in kwargs
    assert kwargs["user"] == "1234:5678" and kwargs["detach"] is True


def test_container_settings_are_checked():
    with pytest.raises(Exception, match="ulimits must be soft:hard numbers"):
        _cfg("tiny_demo", **{"container.ulimits": "{nofile: lots}"})
    with pytest.raises(Exception, match="shm_size only applies with ipc: private"):
        _cfg("tiny_demo", **{"container.ipc": "host", "container.shm_size": "1g"})


class _FakeImage:
    labels = {"org.opencontainers.image.revision": "abc123"}


def _fake_engine(monkeypatch, image=_FakeImage(), gpu=None):
    monkeypatch.setattr(engine, "probe", lambda: ("client", "the container engine at unix:///fake.sock"))
    monkeypatch.setattr(engine, "connect", lambda: ("client", "the container engine at unix:///fake.sock"))
    monkeypatch.setattr(engine, "find_image", lambda client, tag: image)
    monkeypatch.setattr(engine, "gpu_runtime", lambda client: gpu)


def _plan(cfg, device: str) -> JobPlan:
    """The plan `start` makes for a container job on `device`."""
    image = Decision(image_for(cfg, device)[0], "test")
    return JobPlan(device=Decision(device, "test"), method=Decision("lora", "test"),
                   runner=Decision("container", "test"), image=image)


def test_preflight_refusals(monkeypatch):
    runner = ContainerRunner()
    cfg = _cfg("tiny_demo")
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(UserError, match=r"no container engine answers at unix:///nonexistent/docker.sock .*"
                                        r"scripts/container_setup.sh.*--runner local"):
        runner.preflight(cfg, _plan(cfg, "cpu"))

    _fake_engine(monkeypatch, image=None)
    with pytest.raises(UserError, match=rf"image llamafarm-cpu:{version()} is not in the container engine at "
                                        r"unix:///fake.sock; build it with `llamafarm images build cpu`"):
        runner.preflight(cfg, _plan(cfg, "cpu"))

    _fake_engine(monkeypatch, gpu=None)
    cuda = _cfg("cuda_fine_tuning")
    with pytest.raises(UserError, match="trains on cuda but the container engine at unix:///fake.sock has no NVIDIA GPU runtime; "
                                        "install the NVIDIA Container Toolkit"):
        runner.preflight(cuda, _plan(cuda, "cuda"))
    _fake_engine(monkeypatch, gpu="the nvidia runtime")
    monkeypatch.setattr(images, "commit", lambda: "abc123")
    assert runner.preflight(cuda, _plan(cuda, "cuda")) == (
        f"image llamafarm-cuda:{version()} (commit abc123) on the container engine at unix:///fake.sock")
    monkeypatch.setattr(images, "commit", lambda: "def456")  # the checkout moved on since the image was built
    assert runner.preflight(cuda, _plan(cuda, "cuda")).endswith(
        "; this checkout is at commit def456, so the job runs the image's trainer code, not the checkout's "
        "(`llamafarm images build cuda` rebuilds it)")

    with pytest.raises(UserError, match="MPS device cannot be used from a container.*--runner native"):
        runner.preflight(cfg, _plan(cfg, "mps"))


def test_auto_rules(monkeypatch):
    monkeypatch.delenv("LLAMAFARM_RUNNER")
    cfg = _cfg("tiny_demo")
    runner, why = choose_runner(None, "auto", cfg, "mps")
    assert runner.name == "native" and "Metal cannot be used from a container" in why
    _fake_engine(monkeypatch)
    runner, why = choose_runner(None, "auto", cfg, "cpu")
    assert (runner.name, why) == ("container", f"auto; device cpu: the container engine at unix:///fake.sock has "
                                               f"llamafarm-cpu:{version()}")
    _fake_engine(monkeypatch, image=None)
    runner, why = choose_runner(None, "auto", cfg, "cpu")
    assert runner.name == "local" and why.startswith(f"auto; image llamafarm-cpu:{version()} is not built")
    _fake_engine(monkeypatch, gpu=None)
    runner, why = choose_runner(None, "auto", cfg, "cuda")
    assert runner.name == "local" and "has no NVIDIA GPU runtime" in why
    monkeypatch.setattr(engine, "probe", lambda: (None, "no container engine: DOCKER_HOST is not set"))
    assert choose_runner(None, "auto", cfg, "cpu") == (RUNNERS["local"], "auto; no container engine: DOCKER_HOST "
                                                                         "is not set, so the local process")
    monkeypatch.setenv("LLAMAFARM_RUNNER", "native")
    assert choose_runner(None, "auto", cfg, "cpu") == (RUNNERS["native"], "LLAMAFARM_RUNNER=native")
    assert choose_runner("container", "auto", cfg, "cpu") == (RUNNERS["container"], "--runner flag")


def test_no_engine_refuses_before_a_job_exists(run_cli, monkeypatch, _isolated_home):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    result = run_cli("run", "--strategy", "tiny_demo", "--dataset", QA, "--runner", "container")
    assert result.exit_code == 1
    assert "Error: no container engine answers at unix:///nonexistent/docker.sock" in result.output
    assert "Traceback" not in result.output
    assert not (_isolated_home / "jobs").exists() or not any((_isolated_home / "jobs").iterdir())


# --- real runs through the machine's engine ----------------------------------------------------


@pytest.fixture(scope="module")
def cpu_image():
    """The engine and the CPU image; CI builds both (scripts/container_setup.sh) before the tests."""
    client, where = engine.probe()
    if client is None:
        pytest.fail(f"{where}: run `bash scripts/container_setup.sh` (or start Docker and "
                    "`llamafarm images build cpu`) before the container tests")
    if engine.find_image(client, IMAGES["cpu"].tag) is None:
        pytest.fail(f"{IMAGES['cpu'].tag} is not built in {where}: run `llamafarm images build cpu`")
    from trainer.models.builtin import builtin_path

    builtin_path("builtin:tiny-llama-bpe")  # built here once; containers find it in the mounted cache
    return client


def _wait(folder: Path, done, what: str, timeout: float = 240, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = read_job(folder)
        if done(job):
            return job
        time.sleep(poll)
    log = (folder / "train.log").read_text() if (folder / "train.log").exists() else ""
    pytest.fail(f"timed out waiting for {what}; job: {read_job(folder)}\ntrain.log:\n{log[-3000:]}")


def _removed(client, folder: Path) -> None:
    """The supervisor removes the container right after it ends, then ends itself."""
    deadline = time.time() + 60
    while pid_alive(read_job(folder)["pid"]) or client.containers.list(all=True, filters={"name": f"llamafarm-{folder.name}"}):
        assert time.time() < deadline, "the container was not removed, or its supervisor did not end"
        time.sleep(0.5)


def test_tiny_demo_runs_in_the_cpu_image(run_cli, cpu_image, _isolated_home):
    result = run_cli("run", "--strategy", "tiny_demo", "--dataset", QA, "--runner", "container",
                     "--set", "training_args.max_steps=6", "--set", "training_args.logging_steps=2",
                     "--set", "training_args.precision=fp32", "--json",  # fp32: fastest on any CPU
                     # The image carries the C++ toolchain torch.compile needs on CPU (images/cpu/Dockerfile),
                     # which builds our softmax kernel too (the blockwise attention's, over 256 tokens).
                     "--set", "training_args.torch_compile=true", "--set", "training_args.max_seq_length=512")
    assert result.exit_code == 0, result.output
    assert f"runner: container (--runner flag); image {IMAGES['cpu'].tag}" in result.output
    folder = Path(json.loads(result.stdout)["job_dir"])
    job = _wait(folder, lambda j: j["status"] in ("completed", "failed", "stopped"), "the job to end")
    # The trainer in the container writes the status; its supervisor is still copying the last lines of
    # the container's output into train.log until it exits.
    _wait(folder, lambda j: not pid_alive(j["pid"]), "the supervisor to finish train.log")
    log = (folder / "train.log").read_text()
    assert job["status"] == "completed", log[-3000:]
    assert runner_of(job) == "container" and job["container"]["image"] == IMAGES["cpu"].tag
    assert f"container runner: container llamafarm-{folder.name}" in log and "status: completed" in log
    assert "device: cpu" in log  # the trainer's own decisions, printed inside the container, reach train.log
    assert "compile: on" in log and "CppCompileError" not in log, log[-3000:]  # a failed compile runs eagerly
    # Built and measured in the container (whichever it then chose): not refused for want of a compiler.
    assert re.search(r"attention softmax: (fused|aten) \(.*ns per score with the kernel", log), log[-3000:]
    # And the length from which a kernel per sequence takes long packed sequences, measured there too (the
    # tiny builtin's 32-wide heads go through torch's: our flash kernel takes 64 and 128).
    assert "sequence kernel: sdpa (torch's kernel: our flash kernel takes heads (64, 128) wide, not 32)" in log
    assert re.search(r"attention segments: (off|128|256|512) \(.*512 tokens \d", log), log[-3000:]
    assert job["decisions"]["attention_segments"]["value"] in ("off", "128", "256", "512")
    for name in ("final/model.safetensors", "final/strategy.yaml", "final/tokenizer.json", "metrics.jsonl"):
        assert (folder / name).is_file(), name
    assert list((_isolated_home / "cache" / "tokenized").glob("*.npz"))  # the trainer's cache, shared with the host
    owners = {p.stat().st_uid for p in folder.rglob("*")}
    assert owners == {os.getuid()}, f"files not owned by the caller: {owners}"
    monitor = run_cli("finetune", "monitor", "--job-id", folder.name, "--json")
    summary = json.loads(monitor.stdout)
    assert (summary["status"], summary["step"], summary["total_steps"]) == ("completed", 6, 6)
    _removed(cpu_image, folder)


def test_stop_ends_the_container_with_a_checkpoint_and_resume_continues(run_cli, cpu_image):
    result = run_cli("run", "--strategy", "tiny_demo", "--dataset", QA, "--runner", "container",
                     "--set", "training_args.max_steps=5000", "--set", "training_args.precision=fp32", "--json")
    assert result.exit_code == 0, result.output
    folder = Path(json.loads(result.stdout)["job_dir"])
    _wait(folder, lambda j: j["status"] == "running" and (folder / "metrics.jsonl").exists(), "the first steps")
    stopped = run_cli("finetune", "stop", "--job-id", folder.name)
    assert stopped.exit_code == 0, stopped.output
    job = _wait(folder, lambda j: j["status"] in ("completed", "failed", "stopped"), "the job to stop", timeout=120)
    assert job["status"] == "stopped", (folder / "train.log").read_text()[-3000:]
    checkpoint = sorted((folder / "checkpoints").glob("checkpoint-*/trainer_state.json"))
    assert checkpoint
    _removed(cpu_image, folder)

    resumed = run_cli("finetune", "resume", "--job-id", folder.name)  # a new container, from the checkpoint
    assert resumed.exit_code == 0, resumed.output
    step = json.loads(checkpoint[-1].read_text())["step"]
    _wait(folder, lambda j: j["status"] == "running" and j.get("resumes") == 1 and max(
        (m.get("step", 0) for m in read_metrics(folder)), default=0) > step, "the resumed job's next step")
    assert f"resume: from checkpoint-{step}" in (folder / "train.log").read_text()
    assert run_cli("finetune", "stop", "--job-id", folder.name).exit_code == 0
    assert _wait(folder, lambda j: j["status"] in ("completed", "failed", "stopped"), "the resumed job to stop",
                 timeout=120)["status"] == "stopped"
    _removed(cpu_image, folder)


def _container_job(run_cli, strategy_file: Path, *extra) -> Path:
    result = run_cli("run", "--strategy", "repro", "--strategy-file", strategy_file, "--dataset", QA,
                     "--runner", "container", "--json", *extra)
    assert result.exit_code == 0, result.output
    return Path(json.loads(result.stdout[result.stdout.index("{"):])["job_dir"])


def _at_step(folder: Path, step: int):
    return lambda j: max((m.get("step", 0) for m in read_metrics(folder) if "loss" in m), default=0) >= step


def test_a_job_follows_its_container_when_the_supervisor_is_killed(run_cli, cpu_image, tmp_path):
    import signal

    from orchestrator import jobs
    from test_resume import STRATEGY

    strategy_file = tmp_path / "repro.yaml"
    strategy_file.write_text(json.dumps(STRATEGY))
    folder = _container_job(run_cli, strategy_file, "--set", "training_args.max_steps=5000")
    _wait(folder, _at_step(folder, 2), "the first steps")
    pid = read_job(folder)["pid"]
    os.kill(pid, signal.SIGKILL)  # the host side dies; the container trains on
    deadline = time.time() + 30  # kill() returns before a busy machine has ended the process
    while pid_alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    job = jobs.refresh(folder)
    assert job["status"] == "running" and f"container llamafarm-{folder.name} still trains" in job["note"], job
    refused = run_cli("finetune", "resume", "--job-id", folder.name)
    assert refused.exit_code != 0 and "still trains" in refused.output and "finetune stop" in refused.output
    assert "still trains" in run_cli("finetune", "monitor", "--job-id", folder.name).output
    assert run_cli("finetune", "stop", "--job-id", folder.name).exit_code == 0  # through the engine
    job = _wait(folder, lambda j: j["status"] in ("completed", "failed", "stopped"), "the container to stop", timeout=120)
    assert job["status"] == "stopped", job
    # With no supervisor to remove the ended container, the next resume's supervisor does; here the test does.
    cpu_image.containers.get(f"llamafarm-{folder.name}").remove(force=True)


def test_a_trainer_killed_in_its_container_resumes_bitwise_identical(run_cli, cpu_image, tmp_path, monkeypatch):
    import random

    from test_resume import STRATEGY, _weights_digest

    strategy_file = tmp_path / "repro.yaml"
    # 150 steps (~7 s here): seeing a step, then killing through the engine, takes up to a second on a busy
    # machine; with 12 steps a fast machine finished the job first (CI saw it complete).
    strategy = json.loads(json.dumps(STRATEGY))
    strategy["repro"]["fine_tuner"]["config"]["training_args"]["max_steps"] = 150
    # One thread count for every run (the trainer drops to one thread when other programs hold the cores,
    # which could make the reference and the killed run differ on a busy machine); the resumed run must
    # keep its run's count by itself (a resume here once probed 1 thread against the run's 2).
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    strategy["repro"]["fine_tuner"]["config"]["container"] = {"pass_env": ["OMP_NUM_THREADS"]}
    strategy_file.write_text(json.dumps(strategy))
    reference = _container_job(run_cli, strategy_file, "--foreground")
    assert read_job(reference)["status"] == "completed"

    folder = _container_job(run_cli, strategy_file)
    _wait(folder, _at_step(folder, random.Random().randint(3, 7)), "the step to kill the trainer at", poll=0.05)
    cpu_image.containers.get(f"llamafarm-{folder.name}").kill(signal="SIGKILL")
    job = _wait(folder, lambda j: j["status"] in ("completed", "failed", "stopped"), "the job to fail")
    assert job["status"] == "failed" and "exited with code 137: killed (SIGKILL)" in job["error"], job
    _removed(cpu_image, folder)
    resumed = run_cli("finetune", "resume", "--job-id", folder.name, "--foreground")
    assert resumed.exit_code == 0, (folder / "train.log").read_text()[-3000:]
    assert _weights_digest(folder / "final") == _weights_digest(reference / "final"), "resumed in a new container"
    assert "threads: 2 (kept from the run this resumes" in (folder / "train.log").read_text()
    _removed(cpu_image, folder)
