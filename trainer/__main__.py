"""The trainer's own command line, used by runners and the CLI (not by people; they use `llamafarm`,
which has checked every argument already; the choices are repeated here from contract/ so a bad one
still fails by name).

    python -m trainer train <job_dir>
    python -m trainer generate <folder> --prompt "..." [--max-new-tokens N] [--temperature T] [--greedy] [--seed N]
    python -m trainer evaluate <folder> <dataset> --output result.json [--samples N] [--max-new-tokens N] [--greedy] [--seed N]
    python -m trainer dataset-stats <dataset> < strategy.yaml
    python -m trainer calibrate [--device cpu] [--dtype fp32]
    python -m trainer probe-precision --hidden H --intermediate I
    python -m trainer merge-base <final> <target>
    python -m trainer export <folder> [--format F] [--quantization Q] [--output DIR] [--name NAME] [--force] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from contract.errors import UserError
from contract.export_options import FORMATS, QUANTIZATIONS


def _show(text: str) -> None:
    """A piece of a streamed answer, on stdout at once (the terminal, or the dashboard's chat)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def _train(args) -> int:
    from trainer.entrypoint import run

    return run(args.job_dir)


def _calibrate(args) -> int:
    from trainer.devices import matmul_rate

    print(json.dumps(matmul_rate(args.device, args.dtype)), flush=True)
    return 0


def _probe_precision(args) -> int:
    from contract.precision_probe import probe_shape
    from trainer.devices import precision_rates

    print(json.dumps(precision_rates(probe_shape(args.hidden, args.intermediate))), flush=True)
    return 0


def _generate(args) -> int:
    if args.folder.suffix == ".gguf":
        from trainer.export.generate_gguf import generate_gguf, sampling_for

        sampling = sampling_for(args.folder, args.greedy, args.seed, args.temperature)
        print(sampling.describe(), file=sys.stderr, flush=True)
        generate_gguf(args.folder, args.prompt, args.max_new_tokens, sampling, on_text=_show)
    else:
        from trainer.generate import generate

        generate(args.folder, args.prompt, args.max_new_tokens, args.greedy, args.seed, args.temperature, on_text=_show)
    print(flush=True)
    return 0


def _export(args) -> int:
    from trainer.export.run import export

    report = export(args.folder, args.fmt, args.quantization, args.output, args.name, args.force)
    print(json.dumps(report) if args.json else f"exported: {report['output']}", flush=True)
    return 0


def _evaluate(args) -> int:
    from trainer.evaluate import evaluate

    result = evaluate(args.folder, args.dataset, args.samples, args.max_new_tokens, args.greedy, args.seed)
    tmp = args.output.with_name(f".{args.output.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.output)  # readers see the whole result or none
    return 0


def _merge_base(args) -> int:
    from trainer.models.job_output import merge

    merge(args.final, args.target)
    return 0


def _dataset_stats(args) -> int:
    import yaml

    from contract.strategy import parse_strategy
    from inputs.data.preference import read_for_stage
    from trainer.data.report import token_stats

    cfg = parse_strategy("stdin", yaml.safe_load(sys.stdin.read())).cfg
    print(json.dumps(token_stats(read_for_stage(args.dataset, cfg), cfg)), flush=True)
    return 0


def _sampling_options(parser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--seed", type=int, default=None)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="run the job in a job folder").add_argument("job_dir", type=Path)
    gen = sub.add_parser("generate", help="answer a prompt with a trained model folder or a GGUF")
    gen.add_argument("folder", type=Path)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--temperature", type=float, default=None, help="overrides export.ollama.temperature")
    _sampling_options(gen)
    ev = sub.add_parser("evaluate", help="loss, perplexity and sample answers, fine-tuned vs base")
    ev.add_argument("folder", type=Path)
    ev.add_argument("dataset", type=Path)
    ev.add_argument("--output", type=Path, required=True)
    ev.add_argument("--samples", type=int, default=3)
    _sampling_options(ev)
    ev.set_defaults(max_new_tokens=64)
    cal = sub.add_parser("calibrate", help="measure this machine's matmul rate (GFLOP/s) for the estimator")
    cal.add_argument("--device", default="cpu")
    cal.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    probe = sub.add_parser("probe-precision", help="fp32 and bf16 GFLOP/s on a model's MLP matmul (cached per machine)")
    probe.add_argument("--hidden", type=int, required=True)
    probe.add_argument("--intermediate", type=int, required=True)
    stats = sub.add_parser("dataset-stats", help="token lengths of a dataset under the strategy read from stdin")
    stats.add_argument("dataset", type=Path)
    merge = sub.add_parser("merge-base", help="fold a LoRA job output into its base: a plain model folder at TARGET")
    merge.add_argument("final", type=Path)
    merge.add_argument("target", type=Path)
    exp = sub.add_parser("export", help="merged weights, GGUF, GGUF LoRA or an Ollama folder, verified")
    exp.add_argument("folder", type=Path)
    exp.add_argument("--format", dest="fmt", choices=FORMATS)
    exp.add_argument("--quantization", choices=QUANTIZATIONS)
    exp.add_argument("--output", type=Path)
    exp.add_argument("--name")
    exp.add_argument("--force", action="store_true")
    exp.add_argument("--json", action="store_true", help="print the report as JSON on the last line")
    return parser


COMMANDS = {"train": _train, "calibrate": _calibrate, "probe-precision": _probe_precision, "generate": _generate, "export": _export,
            "evaluate": _evaluate, "merge-base": _merge_base, "dataset-stats": _dataset_stats}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:  # the job commands record their own errors in job.json; these print them
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
