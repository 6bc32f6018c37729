"""The trainer's own command line, used by runners (not by people; they use `llamafarm`).

    python -m trainer train <job_dir>
    python -m trainer generate <folder> --prompt "..." [--max-new-tokens N] [--temperature T] [--greedy] [--seed N]
    python -m trainer evaluate <folder> <dataset> --output result.json [--samples N] [--max-new-tokens N] [--greedy] [--seed N]
    python -m trainer dataset-stats <dataset> < strategy.yaml
    python -m trainer calibrate [--device cpu] [--dtype fp32]
    python -m trainer export <folder> [--format F] [--quantization Q] [--output DIR] [--name NAME] [--force] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from contract.errors import UserError


def _show(text: str) -> None:
    """A piece of a streamed answer, on stdout at once (the terminal, or the dashboard's chat)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run the job in a job folder")
    train.add_argument("job_dir", type=Path)
    gen = sub.add_parser("generate", help="answer a prompt with a trained model folder")
    gen.add_argument("folder", type=Path)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=None, help="overrides export.ollama.temperature")
    gen.add_argument("--greedy", action="store_true")
    gen.add_argument("--seed", type=int, default=None)
    ev = sub.add_parser("evaluate", help="loss, perplexity and sample answers, fine-tuned vs base")
    ev.add_argument("folder", type=Path)
    ev.add_argument("dataset", type=Path)
    ev.add_argument("--output", type=Path, required=True)
    ev.add_argument("--samples", type=int, default=3)
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--greedy", action="store_true")
    ev.add_argument("--seed", type=int, default=None)
    cal = sub.add_parser("calibrate", help="measure this machine's matmul rate (GFLOP/s) for the estimator")
    cal.add_argument("--device", default="cpu")
    cal.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    stats = sub.add_parser("dataset-stats", help="token lengths of a dataset under the strategy read from stdin")
    stats.add_argument("dataset", type=Path)
    merge = sub.add_parser("merge-base", help="fold a LoRA job output into its base: a plain model folder at TARGET")
    merge.add_argument("final", type=Path)
    merge.add_argument("target", type=Path)
    exp = sub.add_parser("export", help="merged weights, GGUF, GGUF LoRA or an Ollama folder, verified")
    exp.add_argument("folder", type=Path)
    exp.add_argument("--format", dest="fmt")
    exp.add_argument("--quantization")
    exp.add_argument("--output", type=Path)
    exp.add_argument("--name")
    exp.add_argument("--force", action="store_true")
    exp.add_argument("--json", action="store_true", help="print the report as JSON on the last line")
    args = parser.parse_args(argv)

    if args.command == "train":
        from trainer.entrypoint import run

        return run(args.job_dir)
    if args.command == "calibrate":
        from trainer.devices import matmul_rate

        print(json.dumps(matmul_rate(args.device, args.dtype)), flush=True)
        return 0
    try:
        if args.command == "generate" and args.folder.suffix == ".gguf":
            from trainer.export.generate_gguf import generate_gguf, sampling_for

            sampling = sampling_for(args.folder, args.greedy, args.seed, args.temperature)
            print(sampling.describe(), file=sys.stderr, flush=True)
            generate_gguf(args.folder, args.prompt, args.max_new_tokens, sampling, on_text=_show)
            print(flush=True)
        elif args.command == "generate":
            from trainer.generate import generate

            generate(args.folder, args.prompt, args.max_new_tokens, args.greedy, args.seed, args.temperature,
                     on_text=_show)
            print(flush=True)
        elif args.command == "export":
            from trainer.export.run import export

            report = export(args.folder, args.fmt, args.quantization, args.output, args.name, args.force)
            print(json.dumps(report) if args.json else f"exported: {report['output']}", flush=True)
        elif args.command == "merge-base":
            from trainer.models.job_output import merge

            merge(args.final, args.target)
        elif args.command == "evaluate":
            from trainer.evaluate import evaluate

            result = evaluate(args.folder, args.dataset, args.samples, args.max_new_tokens, args.greedy, args.seed)
            tmp = args.output.with_name(f".{args.output.name}.tmp")
            tmp.write_text(json.dumps(result, indent=2) + "\n")
            tmp.replace(args.output)
        else:
            import yaml

            from contract.strategy import parse_strategy
            from inputs.data.preference import read_for_stage
            from trainer.data.report import token_stats

            cfg = parse_strategy("stdin", yaml.safe_load(sys.stdin.read())).cfg
            rows = read_for_stage(args.dataset, cfg)
            print(json.dumps(token_stats(rows, cfg)), flush=True)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
