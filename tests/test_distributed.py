"""Distributed training (distributed.mode ddp/fsdp) on CPU with gloo, through the real launcher
(python -m torch.distributed.run) started by the local runner.

The proof: two DDP processes follow the single-process loss curve and end at the same adapter for the
same global batch (per_device_train_batch_size x gradient_accumulation_steps x processes) and seed;
FSDP does the same for a full fine-tune; a stopped DDP job resumes to the weights of an uninterrupted
one; two launchers meeting at a c10d rendezvous on 127.0.0.1 (two "machines") complete one job; one
rank's failure fails the job with that rank's error. The launch commands are asserted exactly.
"""

from __future__ import annotations

import copy
import json
import socket
import sys
import time
from pathlib import Path

import pytest
import yaml

from contract.errors import StrategyError
from contract.job_folder import complete_checkpoints, read_job, read_metrics
from contract.strategy import parse_strategy, resolved_dict

from conftest import DATASETS
from test_end_to_end import _wait as wait_for_status

pytestmark = pytest.mark.slow  # trains, exports or evaluates real jobs

# Tolerances for "the same run": float sums happen in another order (gradients averaged across
# processes by all-reduce, micro-batches padded to other widths), nothing else differs.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 2e-5
# AdamW divides each gradient element by its own root mean square, so an element whose gradient is near
# zero moves by about the learning rate in the direction of its sign, and summation-order noise that flips
# that sign moves it up to ~2 x lr the other way (seen with the default 1e-8: a few of 600k weights 1.3e-4
# to 1.6e-4 apart, in about one run in six, the losses equal to 1e-5). With an epsilon of 1e-3, gradients
# smaller than that are scaled rather than normalised, so the comparison sees the distributed arithmetic,
# not AdamW's sign of noise (six pairs of runs: 1.5e-8 to 1.7e-7 apart).
ADAM_EPSILON = 1e-3

BASE = {
    "base_model": {"name": "spm", "huggingface_id": "builtin:tiny-llama-spm"},
    # Dropout off: with dropout each process draws its own masks, so runs agree only statistically.
    "method": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "training_args": {"max_steps": 6, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4,
                      "learning_rate": 2e-3, "max_seq_length": 256, "seed": 3, "precision": "fp32",
                      "adam_epsilon": ADAM_EPSILON},
    "device": "cpu",
}


def _strategy(tmp_path: Path, name: str, **changes) -> Path:
    cfg = copy.deepcopy(BASE)
    for section, values in changes.items():
        if section == "training_args":  # merged; other sections are replaced
            cfg[section].update(values)
        else:
            cfg[section] = values
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({name: {"fine_tuner": {"config": cfg}}}))
    return path


def _start(run_cli, strategy_file: Path, *extra) -> Path:
    name = strategy_file.stem
    result = run_cli("finetune", "start", "--strategy", name, "--strategy-file", strategy_file, "--runner", "local",
                     "--dataset", DATASETS / "medical_qa.jsonl", "--json", *extra)
    assert result.exit_code in (0, 1), result.output
    return Path(json.loads(result.stdout[result.stdout.index("{"):])["job_dir"])


def _wait(folder: Path, statuses=("completed", "failed", "stopped"), timeout: float = 300) -> dict:
    return wait_for_status(folder, statuses, timeout)


def _completed(folder: Path) -> dict:
    job = _wait(folder)
    assert job["status"] == "completed", (job, (folder / "train.log").read_text()[-4000:])
    return job


def _losses(folder: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(folder) if "loss" in r]


def _weights(folder: Path, name: str = "adapter_model.safetensors") -> dict:
    from safetensors.numpy import load_file

    return load_file(str(folder / "final" / name))


def _assert_same_run(single: Path, multi: Path, weights_file: str = "adapter_model.safetensors") -> None:
    a, b = _losses(single), _losses(multi)
    assert len(a) == len(b) == BASE["training_args"]["max_steps"]
    assert b == pytest.approx(a, rel=LOSS_RTOL), f"loss curves differ: {a} vs {b}"
    wa, wb = _weights(single, weights_file), _weights(multi, weights_file)
    assert sorted(wa) == sorted(wb)
    import numpy as np

    worst = max(float(np.abs(wa[k] - wb[k]).max()) for k in wa)
    assert worst <= WEIGHT_ATOL, f"final weights differ by up to {worst}"
    changed = max(float(np.abs(wa[k]).max()) for k in wa if "lora_B" in k or "lora" not in k)
    assert changed > 100 * WEIGHT_ATOL, "the weights must have moved, or the comparison proves nothing"


# --- the schema ---------------------------------------------------------------------------------


def _parse(**distributed_and_more):
    cfg = {"base_model": {"name": "x", "huggingface_id": "builtin:tiny-llama-spm"}, **distributed_and_more}
    return parse_strategy("test.yaml", {"fine_tuner": {"config": cfg}})


def test_distributed_defaults_to_one_process_and_resolves_small():
    strategy = _parse()
    assert strategy.cfg.distributed.mode == "none"
    assert resolved_dict(strategy)["fine_tuner"]["config"]["distributed"] == {"mode": "none"}
    ddp = _parse(distributed={"mode": "ddp", "nproc_per_node": 2})
    resolved = resolved_dict(ddp)
    assert resolved["fine_tuner"]["config"]["distributed"] == {"mode": "ddp", "nproc_per_node": 2, "nnodes": 1,
                                                              "backend": "auto"}
    parse_strategy("again", resolved)  # what a job folder holds validates again


@pytest.mark.parametrize("cfg, message", [
    ({"distributed": {"nproc_per_node": 2}}, "nproc_per_node only applies when mode is ddp or fsdp"),
    ({"distributed": {"mode": "ddp"}}, "one process in all"),
    ({"distributed": {"mode": "ddp", "nproc_per_node": 2, "rdzv_endpoint": "h:1"}}, "only applies when nnodes > 1"),
    ({"distributed": {"mode": "ddp", "nnodes": 2}}, "rdzv_endpoint (host:port that every machine can reach) is required"),
    ({"distributed": {"mode": "ddp", "nnodes": 2, "rdzv_endpoint": "h:29500", "rdzv_backend": "static",
                      "node_rank": 2}}, "node_rank 2 must be below nnodes (2)"),
    ({"distributed": {"mode": "ddp", "nnodes": 2, "rdzv_endpoint": "h:29500", "node_rank": 1}},
     "node_rank only applies to rdzv_backend static"),
    ({"distributed": {"mode": "ddp", "nnodes": 2, "rdzv_endpoint": "h"}}, "must be host:port"),
    ({"distributed": {"mode": "ddp", "nproc_per_node": 2, "backend": "nccl"}, "device": "cpu"}, "nccl needs CUDA"),
    ({"distributed": {"mode": "ddp", "nproc_per_node": 2}, "device": "mps"}, "no collective backend for mps"),
    ({"distributed": {"mode": "fsdp", "nproc_per_node": 2}, "method": {"type": "qlora"}}, "qlora is not supported"),
    ({"distributed": {"mode": "fsdp", "nproc_per_node": 2}, "training_args": {"save_steps": 5}},
     "checkpoints are not supported with distributed.mode fsdp"),
    ({"distributed": {"mode": "ddp", "nproc_per_node": 2, "processes": 4}}, "unknown key"),
])
def test_nonsense_combinations_are_refused_with_the_reason(cfg, message):
    with pytest.raises(StrategyError) as err:
        _parse(**cfg)
    assert message in str(err.value)
    assert "distributed" in str(err.value)  # the path says where


# --- the launch commands -------------------------------------------------------------------------


def _job_folder(tmp_path: Path, distributed: dict) -> Path:
    folder = tmp_path / "job"
    folder.mkdir()
    strategy = _parse(distributed=distributed, device="cpu")
    (folder / "strategy.yaml").write_text(yaml.safe_dump({"fine_tuner": resolved_dict(strategy)["fine_tuner"]}))
    return folder


def test_local_runner_wraps_the_one_entrypoint_in_the_launcher(tmp_path):
    from orchestrator.runners import get_runner

    folder = _job_folder(tmp_path, {"mode": "ddp", "nproc_per_node": 2})
    assert get_runner("local").launch_spec(folder).argv == [
        sys.executable, "-m", "orchestrator.runners.exit_watch", str(folder), "--",
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=0", "--standalone",
        "-m", "trainer", "train", str(folder)]


def test_multi_node_launch_specs():
    from contract.strategy import DistributedSpec
    from orchestrator.launcher import launch_argv

    entry = ["/py", "-m", "trainer", "train", "/jobs/j"]
    assert launch_argv(entry, DistributedSpec()) == entry  # mode none: unchanged
    fsdp = DistributedSpec(mode="fsdp", nproc_per_node=8, nnodes=2, rdzv_backend="static", node_rank=1,
                           rdzv_endpoint="10.0.0.1:29500", rdzv_id="run7", backend="nccl")
    assert launch_argv(entry, fsdp) == [
        "/py", "-m", "torch.distributed.run", "--nproc-per-node=8", "--max-restarts=0", "--nnodes=2",
        "--rdzv-backend=static", "--rdzv-endpoint=10.0.0.1:29500", "--rdzv-id=run7", "--node-rank=1",
        "-m", "trainer", "train", "/jobs/j"]
    c10d = DistributedSpec(mode="ddp", nnodes=4, rdzv_endpoint="head:29400")
    assert launch_argv(entry, c10d)[3:9] == [
        "--nproc-per-node=1", "--max-restarts=0", "--nnodes=4", "--rdzv-backend=c10d", "--rdzv-endpoint=head:29400",
        "--rdzv-id=llamafarm"]


def test_step_groups_deal_the_same_rows_to_any_number_of_processes():
    from trainer.distributed import World
    from trainer.loop import _step_groups

    batches = [f"b{i}" for i in range(7)]  # micro-batches of one epoch, in order
    one = _step_groups(batches, 4, World())
    assert one == [(["b0", "b1", "b2", "b3"], 4), (["b4", "b5", "b6"], 3)]  # the single-process steps
    r0 = _step_groups(batches, 2, World("ddp", 0, 0, 2))
    r1 = _step_groups(batches, 2, World("ddp", 1, 1, 2))
    assert r0 == [(["b0", "b2"], 2), (["b4", "b6"], 2)]
    assert r1 == [(["b1", "b3"], 2), (["b5", "b4"], 1)]  # ragged end: a weight-0 copy keeps the passes even
    for (g0, n0), (g1, n1), (single, _) in zip(r0, r1, one):
        assert sorted(g0[:n0] + g1[:n1]) == sorted(single)


def test_mode_none_refuses_to_run_under_a_launcher(monkeypatch):
    from contract.decisions import choose_distributed
    from contract.errors import UserError
    from contract.strategy import DistributedSpec
    from trainer.distributed import join

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="distributed.mode is none"):
        join(DistributedSpec(), "cpu", None)
    monkeypatch.delenv("LOCAL_RANK")
    ddp = DistributedSpec(mode="ddp", nproc_per_node=2)
    with pytest.raises(UserError, match="needs PyTorch's launcher"):
        join(ddp, "cpu", choose_distributed(ddp, "cpu"))


# --- real runs on CPU with gloo ----------------------------------------------------------------


def test_two_ddp_processes_follow_the_single_process_run(run_cli, tmp_path):
    # The same global batch of 4 sequences: 1 x 4 accumulation x 1 process, and 1 x 2 x 2 processes.
    single = _start(run_cli, _strategy(tmp_path, "single"), "--foreground")
    ddp = _start(run_cli, _strategy(tmp_path, "ddp", training_args={"gradient_accumulation_steps": 2},
                                    distributed={"mode": "ddp", "nproc_per_node": 2}), "--foreground")
    _completed(single)
    job = _completed(ddp)
    assert job["plan"]["distributed"]["value"]["mode"] == "ddp"
    _assert_same_run(single, ddp)
    log = (ddp / "train.log").read_text()
    assert log.count("status: completed") == 1 and log.count("final weights:") == 1  # rank 0 alone writes


def test_fsdp_full_fine_tune_follows_the_single_process_run(run_cli, tmp_path):
    full = {"method": {"type": "full"}, "training_args": {"learning_rate": 1e-4}}
    single = _start(run_cli, _strategy(tmp_path, "single_full", **full), "--foreground")
    fsdp = _start(run_cli, _strategy(tmp_path, "fsdp_full", method={"type": "full"},
                                     training_args={"learning_rate": 1e-4, "gradient_accumulation_steps": 2},
                                     distributed={"mode": "fsdp", "nproc_per_node": 2}), "--foreground")
    _completed(single)
    _completed(fsdp)
    _assert_same_run(single, fsdp, "model.safetensors")


def test_a_stopped_ddp_job_resumes_to_the_uninterrupted_result(run_cli, tmp_path):
    long = {"training_args": {"gradient_accumulation_steps": 2, "max_steps": 40, "save_steps": 10},
            "distributed": {"mode": "ddp", "nproc_per_node": 2}}
    reference = _start(run_cli, _strategy(tmp_path, "ddp_ref", **long), "--foreground")
    _completed(reference)

    folder = _start(run_cli, _strategy(tmp_path, "ddp_stop", **long))
    deadline = time.time() + 300
    while not any(r.get("step", 0) >= 3 for r in read_metrics(folder)):
        assert time.time() < deadline and read_job(folder)["status"] in ("pending", "running"), read_job(folder)
        time.sleep(0.05)
    result = run_cli("finetune", "stop", "--job-id", folder.name)
    assert result.exit_code == 0, result.output
    job = _wait(folder)
    assert job["status"] == "stopped", (job, (folder / "train.log").read_text()[-3000:])
    assert complete_checkpoints(folder), "a stop saves a checkpoint"

    result = run_cli("finetune", "resume", "--job-id", folder.name, "--foreground")
    assert result.exit_code == 0, result.output
    _completed(folder)
    assert [r["step"] for r in read_metrics(folder) if "loss" in r] == list(range(1, 41))
    import numpy as np

    a, b = _weights(reference), _weights(folder)
    assert all(np.array_equal(a[k], b[k]) for k in a), "resumed DDP run must match the uninterrupted one"
    from trainer.saving import load_checkpoint

    group = load_checkpoint(complete_checkpoints(reference)[-1])[1]["optimizer"]["param_groups"][0]
    assert group["eps"] == ADAM_EPSILON and tuple(group["betas"]) == (0.9, 0.999), "the strategy's AdamW settings"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_meet_at_a_c10d_rendezvous_on_localhost(run_cli, tmp_path):
    # Two launchers, as two hosts would start them; each writes its own job folder.
    endpoint = f"127.0.0.1:{_free_port()}"
    strategy = _strategy(tmp_path, "two_nodes", training_args={"gradient_accumulation_steps": 2, "max_steps": 3},
                         distributed={"mode": "ddp", "nnodes": 2, "rdzv_endpoint": endpoint,
                                      "rdzv_id": f"test{_free_port()}"})
    first = _start(run_cli, strategy)
    second = _start(run_cli, strategy)
    _completed(first)
    _completed(second)
    assert _losses(first) == _losses(second) and len(_losses(first)) == 3  # one job, reduced over both
    import numpy as np

    a, b = _weights(first), _weights(second)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert "2 processes (2 machines x 1)" in read_job(first)["plan"]["distributed"]["reason"]


def test_one_ranks_failure_fails_the_job_with_that_ranks_error(run_cli, tmp_path, monkeypatch):
    # Every python started for the job imports this; only rank 1 breaks, at its third micro-batch.
    hook = tmp_path / "inject"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import trainer.loop as loop\n"
        "    real, calls = loop.collate, []\n"
        "    def collate(*a, **k):\n"
        "        calls.append(1)\n"
        "        if len(calls) == 3:\n"
        "            raise RuntimeError('injected failure on rank 1')\n"
        "        return real(*a, **k)\n"
        "    loop.collate = collate\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(hook))
    folder = _start(run_cli, _strategy(tmp_path, "ddp_fail", training_args={"gradient_accumulation_steps": 2},
                                       distributed={"mode": "ddp", "nproc_per_node": 2}), "--foreground")
    job = _wait(folder)
    assert job["status"] == "failed"
    assert job["error"] == "rank 1: RuntimeError: injected failure on rank 1", job
    assert not (folder / "final").exists()
    from contract.job_folder import pid_alive

    deadline = time.time() + 120
    while pid_alive(job["pid"]):  # the launcher ends the other rank, then prints its summary
        assert time.time() < deadline, "the launcher must end every process when one fails"
        time.sleep(0.2)
    summary = (folder / "train.log").read_text().split("Root Cause (first observed failure):")[-1]
    assert "rank      : 1" in summary and "injected failure on rank 1" in summary, summary


def test_container_runner_starts_the_launcher_in_the_image_one_container_per_machine(tmp_path):
    from orchestrator.runners.container import HostFacts, container_spec

    host = HostFacts(1000, 1000, tmp_path / "home", tmp_path / "cache", None, "unix:///run/engine.sock")
    job = {"dataset": "/data/train.jsonl"}
    two = _parse(device="cuda", distributed={"mode": "fsdp", "nproc_per_node": 8, "nnodes": 2,
                                             "rdzv_endpoint": "10.0.0.1:29500"}).cfg
    spec = container_spec(tmp_path / "job", job, two, "cuda", host)
    assert spec.entrypoint == ["python", "-m", "torch.distributed.run", "--nproc-per-node=8", "--max-restarts=0",
                               "--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29500",
                               "--rdzv-id=llamafarm", "-m", "trainer"]
    assert spec.command == ["train", str((tmp_path / "job").resolve())]  # the image's own arguments
    assert spec.network_mode == "host"  # the launcher must reach the other machine
    kwargs = spec.create_kwargs({})
    assert kwargs["entrypoint"] == spec.entrypoint and kwargs["network_mode"] == "host"

    one = _parse(device="cuda", distributed={"mode": "ddp", "nproc_per_node": 4}).cfg
    spec = container_spec(tmp_path / "job", job, one, "cuda", host)
    assert "--standalone" in spec.entrypoint and spec.network_mode is None
    plain = container_spec(tmp_path / "job", job, _parse(device="cuda").cfg, "cuda", host)
    assert plain.entrypoint is None and "entrypoint" not in plain.create_kwargs({})


def test_estimate_counts_steps_over_all_processes_and_shards_fsdp_memory():
    from orchestrator.estimate import estimate

    def est(**cfg):
        return estimate(_parse(method={"type": "full"}, device="cpu", **cfg), None, "cpu")

    # fp32 set explicitly: in bf16 a single process's chunked loss holds bf16 logits, while distributed
    # runs use the model's own loss with float32 copies (checked below).
    single = est(training_args={"gradient_accumulation_steps": 4, "precision": "fp32"})
    ddp = est(training_args={"gradient_accumulation_steps": 2, "precision": "fp32"},
              distributed={"mode": "ddp", "nproc_per_node": 2})
    fsdp = est(training_args={"gradient_accumulation_steps": 2, "precision": "fp32"},
               distributed={"mode": "fsdp", "nproc_per_node": 2})
    assert single.steps == ddp.steps == fsdp.steps  # the same global batch
    # Per process: a whole copy; only a single process's chunked loss sums the trained output layer's gradient
    # in float32 during the forward pass (vocab x hidden x 4 bytes: 1 MB here).
    head = 2048 * 128 * 4 / 2**20
    assert {**ddp.memory_mb, "logits": 0} == {**single.memory_mb, "logits": 0}
    assert single.memory_mb["logits"] - ddp.memory_mb["logits"] == pytest.approx(head, abs=0.1)
    single_bf16 = est(training_args={"gradient_accumulation_steps": 4, "precision": "bf16"})
    ddp_bf16 = est(training_args={"gradient_accumulation_steps": 2, "precision": "bf16"},
                   distributed={"mode": "ddp", "nproc_per_node": 2})
    assert ddp_bf16.memory_mb["logits"] == pytest.approx(3 * (single_bf16.memory_mb["logits"] - head), abs=0.1)
    assert ddp.peak_memory_mb == pytest.approx(2 * (single.peak_memory_mb - head), abs=0.2)  # two processes share this machine's memory
    # FSDP halves the weights, the weights' fp32 copies and moments (12 bytes per parameter) and the gradients
    # (4 bytes), which count only where they exceed the activations and the loss chunk they replace.
    assert fsdp.memory_mb["weights"] == pytest.approx(ddp.memory_mb["weights"] / 2, abs=0.1)
    params = fsdp.trainable_params / 2 / 2**20
    over = max(0.0, 4 * params - fsdp.memory_mb["activations"] - fsdp.memory_mb["logits"])
    assert fsdp.memory_mb["trainable_state"] == pytest.approx(12 * params + over, abs=0.1)
