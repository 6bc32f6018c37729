"""Multi-stage fine-tuning, end to end, through the llamafarm CLI only:

    .venv/bin/python demos/demo4_advanced_finetuning.py [--steps N]

Stage 1 trains a LoRA on general instruction data (the bundled Q&A); stage 2 trains on a small
code-generation dataset starting from stage 1's output (`base_model.huggingface_id: job:<stage 1>`,
the adapter merged into its base), then is evaluated on held-out code prompts (loss and perplexity
of stage 2 against its base, which is stage 1, and sample generations). Stage 3 is preference
tuning: DPO on the bundled arithmetic pairs (polite, complete answers preferred) from stage 2's
output, evaluated on held-out pairs against its base, stage 2 (each model's preference accuracy and
margin, and DPO's reward metrics). The final model, stage 3, is exported to GGUF and to Ollama, and
llama.cpp generates from the GGUF. The strategies are in demos/strategies/advanced.yaml. Every number printed comes from the jobs. Runs from any working directory; exits
non-zero when a step fails. --steps N caps each stage at N optimizer steps (CI uses it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_steps import DATASETS, DEMOS, StepFailed, banner, main, run, run_json  # noqa: E402

STRATEGIES = DEMOS / "strategies" / "advanced.yaml"
OFFLINE = {"HF_HUB_OFFLINE": "1"}  # builtin models only: nothing is downloaded


def train_stage(title: str, strategy: str, dataset: Path, extra: list[str]) -> dict:
    banner(title)
    run("finetune", "dataset", "validate", str(dataset), "--strategy", strategy, "--strategy-file", str(STRATEGIES),
        env=OFFLINE)
    job = run_json("finetune", "start", "--strategy", strategy, "--strategy-file", str(STRATEGIES),
                   "--dataset", str(dataset), *extra, env=OFFLINE)
    print(f"job: {job['job_id']}")
    run("finetune", "monitor", "--job-id", job["job_id"], "--follow", env=OFFLINE)
    done = run_json("finetune", "monitor", "--job-id", job["job_id"])
    print(f"{strategy}: {done['step']} steps in {done['elapsed']:.0f} s, loss {done['first_loss']:.4f} -> {done['loss']:.4f}")
    return done


def demo(opts) -> None:
    steps = ["--set", f"training_args.max_steps={opts.steps}"] if opts.steps else []
    stage1 = train_stage("1. stage 1: general instruction data", "demo4_stage1_general",
                         DATASETS / "medical_qa.jsonl", steps)
    stage2 = train_stage("2. stage 2: code generation, from stage 1's output", "demo4_stage2_code",
                         DATASETS / "code_instructions.jsonl",
                         [*steps, "--set", f"base_model.huggingface_id=job:{stage1['job_id']}"])
    job_id = stage2["job_id"]

    banner("3. evaluate on held-out code prompts (stage 2 vs its base, stage 1)")
    ev = run_json("finetune", "evaluate", "--model", job_id, "--dataset", str(DATASETS / "code_eval.jsonl"),
                  "--samples", "3", "--max-new-tokens", "40", env=OFFLINE)
    print(f"{ev['rows']} held-out prompts: loss {ev['base']['loss']:.4f} (stage 1) -> {ev['fine_tuned']['loss']:.4f} "
          f"(stage 2); perplexity {ev['base']['perplexity']:.1f} -> {ev['fine_tuned']['perplexity']:.1f}")
    for sample in ev["samples"]:
        print(f"  prompt: {sample['prompt']}\n  stage 1: {sample['base']!r}\n  stage 2: {sample['fine_tuned']!r}")

    stage3 = train_stage("4. stage 3: DPO on preference pairs, from stage 2's output", "demo4_stage3_dpo",
                         DATASETS / "arithmetic_preference.jsonl",
                         [*steps, "--set", f"base_model.huggingface_id=job:{job_id}"])
    job_id = stage3["job_id"]

    banner("5. evaluate on held-out pairs (stage 3 vs its base, stage 2)")
    ev = run_json("finetune", "evaluate", "--model", job_id, "--dataset",
                  str(DATASETS / "arithmetic_preference_eval.jsonl"), "--samples", "2", "--max-new-tokens", "24",
                  env=OFFLINE)
    base, tuned, dpo = ev["base"], ev["fine_tuned"], ev["preference"]
    print(f"{ev['rows']} held-out pairs: chosen answer more likely in {base['preference_accuracy']:.0%} (stage 2) -> "
          f"{tuned['preference_accuracy']:.0%} (stage 3); log-prob margin {base['preference_margin']:.3f} -> "
          f"{tuned['preference_margin']:.3f}")
    print(f"DPO against stage 2: loss {dpo['loss']:.4f}, reward accuracy {dpo['reward_accuracy']:.0%}, "
          f"reward margin {dpo['reward_margin']:.4f}")
    for sample in ev["samples"]:
        print(f"  prompt: {sample['prompt']}\n  stage 2: {sample['base']!r}\n  stage 3: {sample['fine_tuned']!r}")

    banner("6. export the final model (stage 3) to GGUF (q8_0, verified against PyTorch by the exporter)")
    gguf_export = run_json("finetune", "export", "--model-path", job_id, "--format", "gguf", "--quantization", "q8_0",
                           env=OFFLINE)
    gguf = Path(gguf_export["output"]) / "model.gguf"
    if not gguf.is_file():
        raise StepFailed(f"export reported {gguf_export['output']} but it holds no model.gguf")
    print(f"gguf: {gguf} ({gguf.stat().st_size / 1e6:.1f} MB)")

    banner("7. export to Ollama")
    name = f"demo4-{job_id.lower()}"
    ollama = run_json("finetune", "export", "--model-path", job_id, "--format", "ollama", "--name", name, env=OFFLINE)
    print(f"ollama: {ollama['output']} (`ollama create {name} -f {Path(ollama['output']) / 'Modelfile'}` registers it)")

    banner("8. generate from the GGUF")
    run("generate", "--model", str(gguf), "--prompt", "What is 12 plus 30?", "--max-new-tokens", "40", env=OFFLINE)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="stop each stage after this many optimizer steps")
    args = parser.parse_args()
    main(lambda: demo(args))
