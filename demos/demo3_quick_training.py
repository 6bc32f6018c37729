"""The quick workflow, end to end, through the llamafarm CLI only:

    .venv/bin/python demos/demo3_quick_training.py [--strategy NAME] [--dataset FILE] [--steps N]

strategies list -> pick this platform's strategy (m1_fine_tuning on Apple Silicon, cuda_fine_tuning
with an NVIDIA GPU, else cpu_fine_tuning; when its base model cannot be had offline the demo says so
and uses tiny_demo) -> dataset validate -> estimate -> start -> monitor the job -> evaluate the
fine-tuned model against its base on held-out questions -> export to Ollama -> generate from the
exported GGUF. Every number printed comes from the job. Runs from any working directory; exits
non-zero when a step fails. --steps N caps training at N optimizer steps (CI uses it).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_steps import DATASETS, StepFailed, banner, main, run, run_json  # noqa: E402

FALLBACK = "tiny_demo"
QUESTION = "What are the symptoms of anemia?"


def platform_strategy() -> tuple[str, str]:
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return "m1_fine_tuning", "Apple Silicon"
    if shutil.which("nvidia-smi") or Path("/proc/driver/nvidia/version").exists():
        return "cuda_fine_tuning", "an NVIDIA GPU"
    return "cpu_fine_tuning", "no GPU"


def demo(opts) -> None:
    banner("1. strategies")
    run("finetune", "strategies", "list")

    banner("2. the strategy for this machine")
    offline = {"HF_HUB_OFFLINE": "1"}  # the demo never downloads a model
    strategy, why = (opts.strategy, "--strategy") if opts.strategy else platform_strategy()
    print(f"strategy: {strategy} ({why})")
    dataset = Path(opts.dataset).resolve() if opts.dataset else DATASETS / "medical_qa.jsonl"
    held_out = DATASETS / "medical_qa_eval.jsonl"
    probe = run("finetune", "dataset", "validate", str(dataset), "--strategy", strategy, "--json",
                capture=True, env=offline, check=False)
    if probe.returncode and strategy != FALLBACK:
        shown = run_json("finetune", "strategies", "show", strategy)
        model = shown["strategy"]["fine_tuner"]["config"]["base_model"]["huggingface_id"]
        print(f"{strategy} cannot run offline here: its base model {model} is not on this machine and the demo "
              f"downloads nothing; using {FALLBACK}, whose builtin model is built from code")
        strategy = FALLBACK

    banner("3. the dataset")
    report = run_json("finetune", "dataset", "validate", str(dataset), "--strategy", strategy, env=offline)
    print(f"{dataset.name}: {report['rows']} rows ({report['format']} format)")

    overrides = ["--set", f"training_args.max_steps={opts.steps}"] if opts.steps else []
    banner("4. estimate")
    est = run_json("finetune", "estimate", "--strategy", strategy, "--dataset", str(dataset), *overrides, env=offline)
    print(f"estimate: peak {est['peak_memory_mb']:,.0f} MB, about {est['seconds']:.0f} s for {est['steps']} steps")

    banner("5. start")
    job = run_json("finetune", "start", "--strategy", strategy, "--dataset", str(dataset), *overrides, env=offline)
    job_id = job["job_id"]
    print(f"job: {job_id} (runner {job['runner']})")

    banner("6. monitor")
    run("finetune", "monitor", "--job-id", job_id, "--follow", env=offline)
    done = run_json("finetune", "monitor", "--job-id", job_id)
    print(f"trained {done['step']} steps in {done['elapsed']:.0f} s: loss {done['first_loss']:.4f} -> {done['loss']:.4f}")

    banner("7. evaluate: base vs fine-tuned on held-out questions")
    ev = run_json("finetune", "evaluate", "--model", job_id, "--dataset", str(held_out), "--samples", "2",
                  "--max-new-tokens", "48", env=offline)
    print(f"{ev['rows']} held-out rows: loss {ev['base']['loss']:.4f} (base) -> {ev['fine_tuned']['loss']:.4f} "
          f"(fine-tuned); perplexity {ev['base']['perplexity']:.1f} -> {ev['fine_tuned']['perplexity']:.1f}")
    for sample in ev["samples"]:
        print(f"  Q: {sample['prompt']}\n    base:       {sample['base']!r}\n    fine-tuned: {sample['fine_tuned']!r}")

    banner("8. export to Ollama")
    name = f"demo3-{job_id.lower()}"
    exported = run_json("finetune", "export", "--model-path", job_id, "--format", "ollama", "--name", name, env=offline)
    gguf = Path(exported["output"]) / "model.gguf"
    if not gguf.is_file():
        raise StepFailed(f"export reported {exported['output']} but it holds no model.gguf")
    print(f"ollama: {exported['output']} (Modelfile + model.gguf; `ollama create {name} -f "
          f"{Path(exported['output']) / 'Modelfile'}` registers it)")

    banner("9. generate from the exported GGUF")
    run("generate", "--model", str(gguf), "--prompt", QUESTION, "--max-new-tokens", "48", env=offline)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", help="use this strategy instead of the platform's")
    parser.add_argument("--dataset", help="your own training data (default: the bundled medical Q&A)")
    parser.add_argument("--steps", type=int, help="stop training after this many optimizer steps")
    args = parser.parse_args()
    main(lambda: demo(args))
