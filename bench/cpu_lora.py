"""Baseline (transformers Trainer + PEFT) against llamafarm, one after the other, on the same work.

    .venv/bin/python -m bench.cpu_lora [--tokens 200000] [--workdir DIR]

Both train LoRA r 8 / alpha 16 (q_proj, v_proj, lr 3e-4, seed 42, one epoch) on a SmolLM2-135M-shaped
Llama with random weights, over the same text rows of 64-256 tokens. The baseline runs in the
precision that is faster for it on this CPU (the matmul test picks it; a short probe of the other
precision is reported, so the choice is visible); the project runs through `llamafarm finetune
start` with bench/strategy.yaml. Printed for each: real (non-pad) tokens/s after warm-up, peak RSS
of the training process, MFU against the measured matmul peak, eval loss on held-out rows after
training; then the ratios and whether the targets hold. The full result is saved as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contract.plan import all_decisions
from pathlib import Path

from bench import measure
from bench.model import SHAPE, build_model, make_rows, write_rows

ROOT = Path(__file__).resolve().parent.parent
PROBE_STEPS = 3  # the other baseline precision: WARMUP_STEPS untimed, the rest timed
TARGETS = {"ratio": 2.0, "loss_rel": 0.02}


class CommandFailed(SystemExit):
    """A benchmark command that exited non-zero. A bench that lets it through stops with the command line
    and its log's tail; one that goes on (bench.matrix) records `cause`: the exit code and the log's last
    non-empty line, where a command says why (the container engine that does not answer, a strategy
    error), whole up to 400 characters (the engine's message runs ~330 with its advice)."""

    def __init__(self, cmd: list[str], returncode: int, log_text: str):
        super().__init__(f"command failed ({returncode}): {' '.join(cmd)}\n{log_text[-3000:]}")
        # splitlines() also splits at the carriage returns a progress bar rewrites its line with: its last state counts.
        last = next((line.strip() for line in reversed(log_text.splitlines()) if line.strip()), "")
        self.cause = f"command failed ({returncode}): {last[:400] if last else ' '.join(cmd)[:120]}"


def _run(cmd: list[str], env: dict | None = None, log: Path | None = None) -> None:
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") if log else open(os.devnull, "w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise CommandFailed(cmd, proc.returncode, log.read_text() if log else "")


def run_baseline(work: Path, model: Path, data: Path, evals: Path | None, precision: str, max_steps: int, env: dict,
                 device: str = "cpu", extra: tuple[str, ...] = ()) -> dict:
    """`extra`: more bench.baseline flags (the matrix's --batch-size, --max-length, --method)."""
    out = work / f"baseline-{precision}-{'probe' if max_steps > 0 else 'full'}.json"
    _run([sys.executable, "-m", "bench.baseline", "--model", str(model), "--data", str(data),
          *(["--eval", str(evals)] if evals else []), "--precision", precision, "--max-steps", str(max_steps),
          "--device", device, "--out", str(out), *extra], env=env, log=out.with_suffix(".log"))
    r = json.loads(out.read_text())
    r["tokens_per_second"], r["timed_tokens"], r["timed_seconds"] = measure.after_warmup(r["step_seconds"],
                                                                                         r["step_tokens"])
    r["tokens"] = sum(r["step_tokens"])
    return r


def run_project(work: Path, model: Path, data: Path, evals: Path | None, env: dict, sets: tuple[str, ...] = (),
                strategy: str = "bench_cpu_lora", strategy_file: Path = ROOT / "bench" / "strategy.yaml",
                runner: str = "local") -> dict:
    """`sets`: more --set PATH=VALUE for the strategy (the GPU mode sets device and precision).
    `evals`: None for no held-out set (eval_loss None). `runner`: local, or container (bench.matrix --runners)."""
    home = work / ("home" if runner == "local" else f"home-{runner}")
    env = {**env, "LLAMAFARM_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    log = work / ("project.log" if runner == "local" else f"project-{runner}.log")
    _run([sys.executable, "-m", "orchestrator.cli", "finetune", "start", "--strategy", strategy,
          "--strategy-file", str(strategy_file), "--dataset", str(data),
          "--set", f"base_model.huggingface_id={model}", *(["--set", f"dataset.eval_file={evals}"] if evals else []),
          *(arg for s in sets for arg in ("--set", s)),
          "--runner", runner, "--foreground", "--ignore-estimate"], env=env, log=log)
    job_dir = max((home / "jobs").iterdir(), key=lambda p: p.stat().st_mtime)
    job = json.loads((job_dir / "job.json").read_text())
    metrics = [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    ends = [0.0] + [m["elapsed"] for m in steps]
    seconds = [b - a for a, b in zip(ends, ends[1:])]
    tokens = [round(m["tokens_per_second"] * s) for m, s in zip(steps, seconds)]
    tps, timed_tokens, timed_seconds = measure.after_warmup(seconds, tokens)
    return {
        "name": "llamafarm (" + ", ".join(f"{k} {v['value']}" for k, v in all_decisions(job).items()
                                          if k in ("precision", "packing", "base_weights", "chunked_loss", "attention",
                                                   "adapter_inputs", "compile", "threads")) + ")",
        "job_dir": str(job_dir),
        "decisions": all_decisions(job),
        "step_seconds": seconds,
        "step_tokens": tokens,
        "step_losses": [m["loss"] for m in steps],
        "tokens_per_second": tps,
        "timed_tokens": timed_tokens,
        "timed_seconds": timed_seconds,
        "tokens": job["data"]["tokens"],
        "peak_rss_mb": job["measured"]["peak_rss_mb"],
        "eval_loss": [m["eval_loss"] for m in metrics if "eval_loss" in m][-1] if evals else None,
    }


def _row(label: str, r: dict, flops_per_token: float, peak: float) -> str:
    mfu = r["tokens_per_second"] * flops_per_token / (peak * 1e9)
    loss = f"{r['eval_loss']:.4f}" if r.get("eval_loss") is not None else "-"
    rss = f"{r['peak_rss_mb']:,.0f}" if r.get("peak_rss_mb") else "-"
    return f"| {label} | {r['tokens_per_second']:.0f} | {rss} | {100 * mfu:.1f}% | {loss} |"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # ~200k tokens (~1,000 rows of 200 tokens, a small real dataset): long enough that the trainer's
    # own rule compiles the layers (trainer/performance.choose_compile), as it would for a real job.
    p.add_argument("--tokens", type=int, default=200000, help="real training tokens per side (about)")
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "llamafarm-bench"))
    p.add_argument("--no-probe", action="store_true", help="skip the short run of the other baseline precision")
    p.add_argument("--threads", type=int, default=None,
                   help="pin both sides to N threads (OMP_NUM_THREADS); default: each side's own choice")
    a = p.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    work = Path(a.workdir).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / time.strftime("run-%Y%m%d-%H%M%S")
    run_dir.mkdir()
    machine = {
        "cpu": measure.cpu_model(),
        "flags": measure.cpu_flags(),
        "cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, flags {' '.join(machine['flags'])}, "
          f"torch {machine['torch']}, load average {machine['load_average_before']}", flush=True)
    env = dict(os.environ)
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
        torch.set_num_threads(a.threads)
    thread_counts = [a.threads] if a.threads else sorted({machine["cores"], 1})
    peaks = measure.matmul_peak(thread_counts)
    print(f"matmul peak (GFLOP/s, best of {thread_counts} threads): {peaks}", flush=True)

    model = build_model(work / "smollm2-135m-shape")
    tokenizer = AutoTokenizer.from_pretrained(model)
    data = write_rows(make_rows(tokenizer, a.tokens, seed=1), run_dir / "train.jsonl")
    evals = write_rows(make_rows(tokenizer, 2000, seed=2), run_dir / "eval.jsonl")
    lengths = [len(tokenizer(json.loads(line)["text"])["input_ids"]) + 1 for line in data.read_text().splitlines()]
    flops_per_token = measure.lora_flops(SHAPE, lengths) / sum(lengths)
    print(f"work: {len(lengths)} rows, {sum(lengths)} tokens, lengths {min(lengths)}-{max(lengths)}; "
          f"{flops_per_token / 1e6:.0f} MFLOP per token", flush=True)

    # The baseline's precision: the one whose matmuls are faster here, i.e. the harder baseline to beat.
    fast = measure.faster_precision(peaks)
    other = "fp32" if fast == "bf16" else "bf16"
    baseline = run_baseline(run_dir, model, data, evals, fast, -1, env)
    probe = None if a.no_probe else run_baseline(run_dir, model, data, evals, other, PROBE_STEPS, env)
    project = run_project(run_dir, model, data, evals, env)
    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    # The peak again, after both runs: on a shared machine the load changes, and MFU must use the best.
    peaks = {k: max(v, w) for (k, v), w in zip(peaks.items(), measure.matmul_peak(thread_counts).values())}
    peak = max(peaks.values())
    print(f"matmul peak (GFLOP/s, best before and after): {peaks}", flush=True)

    headline = baseline
    if probe and probe["tokens_per_second"] > baseline["tokens_per_second"]:
        print(f"note: the {other} baseline probe was faster than the full {fast} run; it is the headline", flush=True)
        headline = probe
    ratio = project["tokens_per_second"] / headline["tokens_per_second"]
    loss_rel = abs(project["eval_loss"] - baseline["eval_loss"]) / baseline["eval_loss"]
    checks = {
        f"tokens/s ratio >= {TARGETS['ratio']}": ratio >= TARGETS["ratio"],
        "peak RSS <= baseline's": project["peak_rss_mb"] <= baseline["peak_rss_mb"],
        f"eval loss within {100 * TARGETS['loss_rel']:.0f}% of the baseline's": loss_rel <= TARGETS["loss_rel"],
    }

    print("\n| run | real tokens/s | peak RSS MB | MFU | eval loss |\n|---|---|---|---|---|")
    print(_row(baseline["name"], baseline, flops_per_token, peak))
    if probe:
        print(_row(probe["name"] + f", probe of {PROBE_STEPS} steps", probe, flops_per_token, peak))
    print(_row(project["name"], project, flops_per_token, peak))
    print(f"\nreal tokens trained: baseline {baseline['tokens']}, project {project['tokens']}")
    print(f"tokens/s ratio vs {headline['name']}: {ratio:.2f}x")
    if probe and headline is not probe:
        print(f"tokens/s ratio vs {probe['name']} (from its {PROBE_STEPS}-step probe): "
              f"{project['tokens_per_second'] / probe['tokens_per_second']:.2f}x")
    print(f"wall-clock of all training steps, warm-up (and any compile) included: project "
          f"{sum(project['step_seconds']):,.0f} s, baseline {sum(baseline['step_seconds']):,.0f} s "
          f"({sum(baseline['step_seconds']) / sum(project['step_seconds']):.2f}x); project compile: "
          f"{project['decisions'].get('compile', {}).get('value', '-')}")
    print(f"peak RSS: {project['peak_rss_mb']:,.0f} vs {baseline['peak_rss_mb']:,.0f} MB; "
          f"eval loss {project['eval_loss']:.4f} vs {baseline['eval_loss']:.4f} ({100 * loss_rel:.2f}% apart)")
    print(f"load average during the run: {machine['load_average_before']} -> {machine['load_average_after']}; "
          f"threads: {a.threads or 'each side its own'}")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    result = {"threads": a.threads, "machine": machine, "matmul_gflops": peaks, "flops_per_token": flops_per_token, "baseline": baseline,
              "probe": probe, "project": project, "ratio": ratio, "loss_rel": loss_rel, "checks": checks}
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    print(f"result: {run_dir / 'result.json'}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
