"""The estimator: its arithmetic (golden values), its verdict, and its error against real CPU runs of
the builtin tiny models (tiny_demo among them), a SmolLM2-135M-shaped model and the real SmolLM2-135M
(smollm2_medical's LoRA and a full fine-tune): memory within 25%, time within a factor of 3.
Also the progress pictures: the PNG plot, the sparkline and TensorBoard event files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from contract.job_folder import read_job
from contract.strategy import parse_strategy
from orchestrator.estimate import memory
from orchestrator.estimate.shapes import KNOWN, shape_for
from contract.plan import estimate_of

from conftest import DATASETS, ROOT


def _strategy(model="builtin:tiny-llama-spm", method=None, **training):
    return {"fine_tuner": {"config": {
        "base_model": {"name": "m", "huggingface_id": model},
        "method": method or {"type": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "training_args": {"per_device_train_batch_size": 4, "max_seq_length": 256, "logging_steps": 10, **training},
        "device": "cpu"}}}


def test_shapes_and_parameter_counts():
    llama8b = KNOWN["meta-llama/Llama-3.1-8B"]
    assert llama8b.params == 8_030_261_248, "the published parameter count of Llama 3.1 8B"
    assert KNOWN["meta-llama/Llama-3.2-3B"].params == 3_212_749_824
    assert KNOWN["TinyLlama/TinyLlama-1.1B-Chat-v1.0"].params == 1_100_048_384
    shape, source = shape_for(parse_strategy("x", _strategy()).cfg.base_model)
    assert source == "builtin spec" and (shape.hidden_size, shape.num_layers, shape.vocab_size) == (128, 4, 2048)


def test_memory_breakdown_golden():
    # Precision set explicitly: auto depends on the CPU (the faster of bf16 and fp32, measured there).
    s = parse_strategy("x", _strategy(model="meta-llama/Llama-3.1-8B", max_seq_length=2048, precision="fp32"))
    parts = memory(KNOWN["meta-llama/Llama-3.1-8B"], s, "cpu", cpu_kernels=False)
    # fp32 weights; 12 bytes per adapter parameter (its gradients fit in the activations' place); per token
    # and layer 2 x hidden + 3 x intermediate, plus the q/v adapters' dropped inputs and masks (2 x 2 x hidden)
    # and their rank, plus what the blockwise attention keeps for 2048 tokens (q, k and v: (32 + 2 x 8) heads
    # x 128, linear in the length); the chunked loss holds 130 rows of the 128k-vocabulary logits, not all 2048; glibc keeps 0.55 of the
    # activations' memory.
    assert parts == {"weights": 30633.0, "trainable_state": 39.0, "activations": 73744.0, "logits": 190.8,
                     "framework": 430.0, "allocator_kept": 40559.2}
    # Our CPU kernels: the dropout kernel draws the mask again in backward, one copy of each adapter's input
    # less (8,192 tokens x 32 layers x 2 adapters x 4,096 x 4 bytes = 8,192 MB), and the layer kernel keeps
    # no SiLU output (8,192 x 32 x 14,336 x 4 bytes = 14,336 MB).
    assert memory(KNOWN["meta-llama/Llama-3.1-8B"], s, "cpu", cpu_kernels=True) == {
        "weights": 30633.0, "trainable_state": 39.0, "activations": 51216.0, "logits": 190.8, "framework": 430.0,
        "allocator_kept": 28168.8}
    bf16 = parse_strategy("x", _strategy(model="meta-llama/Llama-3.1-8B", max_seq_length=2048, precision="bf16"))
    # Frozen weights and activations in bf16, oneDNN's bf16 runtime on top of the framework, and the
    # loss chunk's logits and softmax in bf16 (2 x 2 bytes against 3 x 4 in fp32).
    assert memory(KNOWN["meta-llama/Llama-3.1-8B"], bf16, "cpu", cpu_kernels=False) == {
        "weights": 15316.5, "trainable_state": 39.0, "activations": 36872.0, "logits": 63.6, "framework": 695.0,
        "allocator_kept": 20279.6}
    assert "allocator_kept" not in memory(KNOWN["meta-llama/Llama-3.1-8B"], bf16, "cuda")
    with_ckpt = memory(KNOWN["meta-llama/Llama-3.1-8B"], s, "cpu", gradient_checkpointing=True)
    assert with_ckpt["activations"] < parts["activations"] / 10


def test_unpacked_rows_are_sequences_of_their_own_and_batches_pad_to_their_longest(monkeypatch):
    """Without packing each row is a sequence: 10 rows in batches of 4 are 3 steps an epoch whatever their
    lengths (counted as full 256-token sequences they were 1 step), and a batch computes its longest row
    for every row in it. Lengths 10, 20, ..., 100 (550 tokens) in batches of 2: the longest of a batch is
    on average sum l_i (i^2 - (i-1)^2) / 10^2 = 71.5, so 715 positions an epoch; in batches of 4,
    sum l_i (i^4 - (i-1)^4) / 10^4 = 84.67, so 847."""
    import orchestrator.estimate as est_module
    from orchestrator.estimate.tokens import TokenCount

    counted = TokenCount(rows=[10 * n for n in range(1, 11)], joined=0, source="golden")
    monkeypatch.setattr(est_module, "_token_count", lambda *a, **k: counted)
    unpacked = _strategy(num_train_epochs=1)
    unpacked["fine_tuner"]["config"]["dataset"] = {"packing": False}
    est = est_module.estimate(parse_strategy("x", unpacked), Path("rows.jsonl"))
    assert (est.steps, est.tokens_per_epoch, est.train_tokens) == (3, 550, 550)
    assert est_module._sequences(parse_strategy("x", unpacked), counted) == (10, 847)
    unpacked["fine_tuner"]["config"]["training_args"]["per_device_train_batch_size"] = 2
    assert est_module._sequences(parse_strategy("x", unpacked), counted) == (10, 715)
    packed = _strategy(num_train_epochs=1)
    assert est_module.estimate(parse_strategy("x", packed), Path("rows.jsonl")).steps == 1  # 550 tokens, 1 sequence


def test_a_run_that_cannot_fit_is_refused_with_advice(run_cli, tmp_path, _isolated_home):
    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text(json.dumps({"vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
                                                 "num_hidden_layers": 80, "num_attention_heads": 64,
                                                 "num_key_value_heads": 8}))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"huge": _strategy(model=str(big))}))
    est = run_cli("finetune", "estimate", "--strategy", "huge", "--strategy-file", tmp_path / "s.yaml", "--json")
    data = json.loads(est.stdout)  # stderr may say the precision probe ran
    assert data["fits"] is False and data["shape_source"] == f"{big}/config.json"
    assert data["advice"][0].startswith("set training_args.gradient_checkpointing: true")
    result = run_cli("run", "--strategy", "huge", "--strategy-file", tmp_path / "s.yaml",
                     "--dataset", DATASETS / "medical_qa.jsonl")
    assert result.exit_code == 1
    assert "needs about" in result.output and "or pass --ignore-estimate to start anyway" in result.output
    assert not (_isolated_home / "jobs").exists()


def test_estimate_for_an_absent_device_does_not_judge(run_cli):
    out = run_cli("finetune", "estimate", "--strategy", "cuda_fine_tuning").output
    assert "verdict: unknown, no cuda device on this machine" in out
    assert "assumed: 1000 rows of 50% of max_seq_length" in out


def test_estimate_imports_no_torch():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom orchestrator.cli import cli\n"
            "r = CliRunner().invoke(cli, ['finetune', 'estimate', '--strategy', 'm1_fine_tuning', '--json'])\n"
            "assert r.exit_code == 0, r.output\nassert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_a_trainers_peak_memory_is_its_own():
    """Linux keeps ru_maxrss across exec: a trainer started by a large process (this test run) reported the
    parent's peak (a 0.5 GB tiny run measured 1.6 GB from a 1.5 GB parent). The trainer reads VmHWM."""
    parent = bytearray(b"\x01") * (600 * 2**20)  # 600 MB resident in this process
    out = subprocess.run([sys.executable, "-c", "from trainer.devices import peak_rss_mb; print(peak_rss_mb())"],
                         cwd=ROOT, check=True, capture_output=True, text=True)
    assert len(parent) and float(out.stdout) < 200


def _smollm_shaped(folder: Path) -> Path:
    """A SmolLM2-135M-shaped Llama, random init, built in code (as the benchmark issue specifies)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trainer.models.builtin import builtin_path

    tok = AutoTokenizer.from_pretrained(builtin_path("builtin:tiny-llama-bpe"))
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _shipped(name: str, **config) -> dict:
    """A shipped strategy with its config updated (training_args merged, None removes one), the eval file
    made absolute."""
    strategy = yaml.safe_load((ROOT / "strategies" / "default_strategies.yaml").read_text())[name]
    cfg = strategy["fine_tuner"]["config"]
    cfg["training_args"].update(config.pop("training_args", {}))
    cfg["training_args"] = {k: v for k, v in cfg["training_args"].items() if v is not None}
    cfg.update(config)
    if cfg.get("dataset", {}).get("eval_file"):
        cfg["dataset"]["eval_file"] = str(ROOT / cfg["dataset"]["eval_file"])
    return strategy


@pytest.mark.parametrize("name", ["tiny_lora_spm", "tiny_full_bpe", "smollm135m_lora", "tiny_demo",
                                  "smollm2_real_lora", "smollm2_real_full"])
def test_estimate_is_close_to_the_measured_run(run_cli, tmp_path, name):
    """The real model's cases take 4 steps: its peak RSS grows with the allocator's kept memory over the
    first 3 (batches of 452, 461, 490 tokens) and not over the next 3 (README, Estimate before, measure after);
    the LoRA case evaluates at its end, as smollm2_medical does."""
    strategies = {
        "tiny_lora_spm": lambda: _strategy(max_steps=30),
        "tiny_full_bpe": lambda: _strategy(model="builtin:tiny-llama-bpe", method={"type": "full"}, max_steps=30),
        "smollm135m_lora": lambda: _strategy(model=str(tmp_path / "smol"), max_steps=6, per_device_train_batch_size=2),
        "tiny_demo": lambda: _shipped("tiny_demo", training_args={"max_steps": 60}),
        "smollm2_real_lora": lambda: _shipped("smollm2_medical", training_args={"max_steps": 4}),
        "smollm2_real_full": lambda: _shipped("smollm2_medical", method={"type": "full"}, dataset={},
                                              training_args={"max_steps": 4, "eval_steps": None}),
    }
    strategies = {name: strategies[name]()}
    if name.startswith("smollm135m"):
        _smollm_shaped(tmp_path / "smol")
    if name.startswith("smollm2_real"):  # built (downloaded and dequantized) here once per machine, not in the run
        from trainer.models.builtin import builtin_path

        builtin_path("builtin:smollm2-135m-instruct")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({name: strategies[name]}))
    result = run_cli("run", "--strategy", name, "--strategy-file", tmp_path / "s.yaml",
                     "--dataset", DATASETS / "medical_qa.jsonl", "--foreground", "--json")
    assert result.exit_code == 0, result.output
    job = read_job(Path(json.loads(result.stdout[result.stdout.index("{"):result.stdout.index("}") + 1])["job_dir"]))
    measured = job["measured"]
    print(name, estimate_of(job), measured)
    assert abs(measured["memory_error"]) <= 0.25, (estimate_of(job), measured)
    # Time within a factor of 3 either way, judged only when the run had the cores to itself: the
    # trainer records the share of its time spent waiting for a core other programs held (`core_wait`,
    # Linux's schedstat). On an idle machine the error is within 35% (README); beside other work a run
    # measured 13x the estimate with every term right. A wrong model (FLOPs counted per sequence, say)
    # is off by more than 3x on any quiet machine.
    if measured["core_wait"] is None or measured["core_wait"] <= 0.2:
        assert 1 / 3 <= 1 + measured["time_error"] <= 3.0, (estimate_of(job), measured)
    else:
        print(f"time not judged: the trainer waited for a core {measured['core_wait']:.0%} of its run")
    assert estimate_of(job)["steps"] == measured["steps"]


def test_plot_sparkline_and_tensorboard(run_cli, tmp_path):
    from orchestrator.plot import sparkline

    assert sparkline([3.0, 2.0, 1.0, 1.0]) == "█▅▁▁"
    assert sparkline([]) == ""
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"tb": _strategy(
        max_steps=4, logging_steps=1, eval_steps=2, report_to="tensorboard", max_seq_length=64)}))
    raw = yaml.safe_load((tmp_path / "s.yaml").read_text())
    raw["tb"]["fine_tuner"]["config"]["dataset"] = {"eval_fraction": 0.1}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    result = run_cli("run", "--strategy", "tb", "--strategy-file", tmp_path / "s.yaml",
                     "--dataset", DATASETS / "medical_qa.jsonl", "--foreground", "--json")
    assert result.exit_code == 0, result.output
    job_id = json.loads(result.stdout[result.stdout.index("{"):result.stdout.index("}") + 1])["job_id"]
    png = tmp_path / "curves.png"
    shown = run_cli("finetune", "monitor", "--job-id", job_id, "--plot", png)
    assert shown.exit_code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert any(c in shown.output for c in "▁▂▃▄▅▆▇█")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from contract.job_folder import jobs_root

    events = EventAccumulator(str(jobs_root() / job_id / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "eval/eval_loss"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("eval/eval_loss")] == [2, 4]



def test_estimate_says_when_the_machine_is_busy(run_cli, monkeypatch):
    from orchestrator.estimate.throughput import busy_note

    assert busy_note("cpu", load=0.3, cores=2) is None
    assert busy_note("cuda", load=9.0, cores=2) is None, "a GPU run does not share the CPU's cores"
    assert "busy (load average 4.0 on 2 cores)" in busy_note("cpu", load=4.0, cores=2)
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    out = run_cli("finetune", "estimate", "--strategy", "tiny_demo").output
    assert "note: this machine is busy (load average 64.0" in out and "longer than this estimate" in out
