"""DPO steps: llamafarm against TRL's DPOTrainer, one after the other, on the same work.

    .venv/bin/python -m bench.dpo_trl [--steps 8] [--threads 2] [--precision bf16|fp32] [--workdir DIR]

Both train a LoRA (r 8 / alpha 16 on q_proj,v_proj, lr 3e-4, seed 42) with the DPO sigmoid loss
(beta 0.1) on the SmolLM2-135M-shaped Llama of bench/model.py, 4 pairs per step, rows of at most 256
tokens, for --steps optimizer steps over the same generated pairs (prompt and both answers are corpus
words; message lists for TRL, so both sides render them with the tokenizer's chat template). The
reference model is, on both sides, the base with the adapter switched off. Threads are pinned to
--threads on both sides (OMP_NUM_THREADS); the precision is the one given (default: the faster matmul
here). Printed: each side's real (non-pad) tokens of chosen + rejected rows per second after the
warm-up steps, peak RSS, and the ratio. The full result is saved as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

from bench import measure
from bench.cpu_lora import _run, run_project
from bench.model import build_model

PAIRS_PER_STEP = 4


def make_pairs(count: int, seed: int) -> list[dict]:
    """Prompts of 16-40 corpus words, answers of 24-80: rows of roughly 60-200 tokens after the template."""
    from inputs.models.builtin import CORPUS

    words = CORPUS.read_text(encoding="utf-8").split()
    rng = random.Random(seed)

    def text(n: int) -> str:
        start = rng.randrange(len(words))
        return " ".join(words[(start + i) % len(words)] for i in range(n))

    return [{"prompt": text(rng.randint(16, 40)), "chosen": text(rng.randint(24, 80)),
             "rejected": text(rng.randint(24, 80))} for _ in range(count)]


def trl_side(a) -> None:
    """TRL's DPOTrainer on the pairs; writes step times, real tokens per step and peak RSS to --out."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from trainer.devices import peak_rss_mb

    torch.set_num_threads(a.threads)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model)
    rows = [json.loads(line) for line in Path(a.data).read_text().splitlines()]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    step_ends: list[float] = []
    tokens_per_step: list[int] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not step_ends:
                step_ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            step_ends.append(time.perf_counter())

    args = DPOConfig(output_dir=str(Path(a.out).parent / "trl-trainer"), per_device_train_batch_size=PAIRS_PER_STEP,
                     learning_rate=3e-4, max_steps=a.steps, bf16=a.precision == "bf16", use_cpu=True, seed=42,
                     logging_steps=1, save_strategy="no", report_to="none", beta=0.1, loss_type=["sigmoid"],
                     max_length=256)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
                         callbacks=[Timer()])
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        tokens_per_step.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    durations = [t1 - t0 for t0, t1 in zip(step_ends, step_ends[1:])]
    Path(a.out).write_text(json.dumps({
        "name": f"TRL DPOTrainer + PEFT ({a.precision}, padded)",
        "step_seconds": durations,
        "step_tokens": tokens_per_step[: len(durations)],
        "peak_rss_mb": peak_rss_mb(),  # this process's own (VmHWM), as the trainer records its peak
        "torch_threads": torch.get_num_threads(),
    }))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per side (the first 2 are warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: the faster matmul here")
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "llamafarm-bench"))
    p.add_argument("--side", choices=["trl"], help=argparse.SUPPRESS)  # internal: run one side
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.side == "trl":
        trl_side(a)
        return 0
    if a.steps <= measure.WARMUP_STEPS:
        p.error(f"--steps must be over the {measure.WARMUP_STEPS} warm-up steps")

    import torch

    work = Path(a.workdir).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / time.strftime("dpo-%Y%m%d-%H%M%S")
    run_dir.mkdir()
    torch.set_num_threads(a.threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    machine = {"cpu": measure.cpu_model(), "flags": measure.cpu_flags(), "cores": len(os.sched_getaffinity(0)),
               "torch": torch.__version__, "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    precision = a.precision
    if precision is None:
        peaks = measure.matmul_peak([a.threads])
        precision = measure.faster_precision(peaks)
        print(f"matmul peak (GFLOP/s, {a.threads} threads): {peaks} -> {precision}", flush=True)
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, flags {' '.join(machine['flags'])}, "
          f"torch {machine['torch']}, load average {machine['load_average_before']}", flush=True)

    model = build_model(work / "smollm2-135m-shape")
    data = run_dir / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(a.steps * PAIRS_PER_STEP, seed=3)))

    out = run_dir / "trl.json"
    _run([sys.executable, "-m", "bench.dpo_trl", "--side", "trl", "--model", str(model), "--data", str(data),
          "--out", str(out), "--steps", str(a.steps), "--threads", str(a.threads), "--precision", precision],
         env=env, log=run_dir / "trl.log")
    trl = json.loads(out.read_text())
    trl["tokens_per_second"], trl["timed_tokens"], trl["timed_seconds"] = measure.after_warmup(
        trl["step_seconds"], trl["step_tokens"])
    ours = run_project(run_dir, model, data, None, env, strategy="bench_cpu_dpo",
                       sets=(f"training_args.max_steps={a.steps}", f"training_args.precision={precision}"))
    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    ratio = ours["tokens_per_second"] / trl["tokens_per_second"]

    print("\n| run | real tokens/s | timed tokens | timed s | peak RSS MB |\n|---|---|---|---|---|")
    for r in (trl, ours):
        print(f"| {r['name']} | {r['tokens_per_second']:.0f} | {r['timed_tokens']} | {r['timed_seconds']:.1f} | "
              f"{r['peak_rss_mb']:,.0f} |")
    print(f"\ntokens/s ratio llamafarm / TRL: {ratio:.2f}x ({a.steps} steps of {PAIRS_PER_STEP} pairs, "
          f"the first {measure.WARMUP_STEPS} untimed; {a.threads} threads; {precision})")
    print(f"load average during the run: {machine['load_average_before']} -> {machine['load_average_after']}")
    result = {"steps": a.steps, "threads": a.threads, "precision": precision, "machine": machine, "trl": trl,
              "project": ours, "ratio": ratio}
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    print(f"result: {run_dir / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
