"""Data and quality: `llamafarm finetune dataset validate` and `llamafarm finetune evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from orchestrator.cli.base import STRATEGY_FILES, emit_json, finetune, load_strategy


@finetune.group()
def dataset():
    """Check a dataset before training.

    \b
    Example:
      llamafarm finetune dataset validate demos/datasets/medical_qa.jsonl --strategy tiny_demo
    """


@dataset.command("validate")
@click.argument("path", type=click.Path())
@click.option("--strategy", "strategy_name", default=None, help="Also measure tokens with this strategy's tokenizer and template.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@STRATEGY_FILES
def dataset_validate(path, strategy_name, as_json, strategy_files):
    """Rows, format, blank and duplicate rows; with --strategy, token lengths (p50/p95/max), rows over
    max_seq_length and tokens per epoch. Exit 1 when a row is unusable (each named with file:line).

    \b
    Example:
      llamafarm finetune dataset validate demos/datasets/medical_chat.jsonl --strategy tiny_demo --json
    """
    import yaml

    from contract.strategy import resolved_dict
    from inputs.data.report import describe

    strategy = load_strategy(strategy_name, (), strategy_files)[1] if strategy_name else None
    d = strategy.cfg.dataset if strategy else None
    report = describe(Path(path), d.format if d else "auto", d.columns if d else None, d.replace if d else None)
    if strategy:
        report.update(_trainer_json(["dataset-stats", str(Path(path).resolve())], yaml.safe_dump(resolved_dict(strategy))))
        report["strategy"] = strategy_name
    if as_json:
        emit_json(report)
        return
    click.echo(f"{report['dataset']}: {report['rows']} rows, {report['format']} format")
    click.echo(f"  blank lines {report['blank_lines']}, duplicate rows {report['duplicates']}, "
               f"multi-turn {report['multi_turn_rows']}, with a system prompt {report['with_system_prompt']}")
    for example in report["duplicate_examples"]:
        click.echo(f"  duplicate: {example}")
    if report["with_tools"]:
        click.echo(f"  with tool calls or tools: {report['with_tools']}")
    if report["unfilled_placeholders"]:
        names = ", ".join(f"{{{{{k}}}}} in {n}" for k, n in sorted(report["unfilled_placeholders"].items()))
        click.echo(f"  warning: unfilled placeholders ({names} rows); fill them with dataset.replace")
    if strategy:
        click.echo(f"  tokens ({strategy_name}, template {report['template']}): p50 {report['tokens_p50']}, "
                   f"p95 {report['tokens_p95']}, max {report['tokens_max']}")
        click.echo(f"  over max_seq_length {report['max_seq_length']}: {report['over_max_seq_length']} rows "
                   f"({report['over_action']}); tokens per epoch {report['tokens_per_epoch']} of "
                   f"{report['tokens_total']} ({report['share_trained']:.0%} trained), in the loss {report['target_tokens']}")
    else:
        click.echo("  (add --strategy NAME for token lengths under that strategy's tokenizer and template)")


def _trainer_json(args: list[str], stdin: str | None = None) -> dict:
    """Run a trainer subcommand (where torch lives) and parse the JSON it prints last."""
    from orchestrator.runners.local import run_trainer

    return json.loads(run_trainer(*args, stdin=stdin).strip().splitlines()[-1])


@finetune.command("evaluate")
@click.option("--model", required=True, help="A job id, a job folder, or a final/ folder.")
@click.option("--dataset", required=True, type=click.Path(),
              help="Held-out data in any supported format, preference pairs and KTO rows included.")
@click.option("--samples", default=3, show_default=True, type=click.IntRange(0, 100), help="Prompts to answer side by side.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1, 4096))
@click.option("--output", type=click.Path(), default=None, help="Where to write the JSON (default: evaluation.json in the job).")
@click.option("--greedy", is_flag=True, help="Answer with the most likely tokens instead of sampling.")
@click.option("--seed", default=None, type=click.IntRange(0), help="Sampling seed (default: a fresh one, as Ollama).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def evaluate_cmd(model, dataset, samples, max_new_tokens, output, greedy, seed, as_json):
    """Eval loss and perplexity of the fine-tuned model and its base, and their answers side by side.

    On preference pairs, also each model's preference accuracy (share of pairs whose chosen answer it
    finds more likely) and margin; a dpo/orpo/kto job adds its own stage's loss and reward metrics,
    with its base as the reference model.

    \b
    Example:
      llamafarm finetune evaluate --model tiny_demo-20260101-120000-ab12 --dataset demos/datasets/medical_qa_eval.jsonl
      llamafarm finetune evaluate --model tiny_dpo-20260101-120000-ab12 --dataset demos/datasets/arithmetic_preference_eval.jsonl
    """
    from orchestrator import jobs
    from orchestrator.runners.local import run_trainer
    from inputs.data.preference import read_eval_data
    from inputs.models.plain_folder import folder_strategy

    folder = jobs.model_folder(model)
    # A bad file, or data this model cannot be scored on, is reported here (file:line) before any model loads.
    read_eval_data(dataset, folder_strategy(folder)[0].cfg)
    out = Path(output) if output else folder.parent / "evaluation.json"
    if output is None and not (folder.parent / "job.json").exists():
        out = folder / "evaluation.json"
    run_trainer("evaluate", str(folder), str(Path(dataset).resolve()), "--output", str(out.resolve()),
                "--samples", str(samples), "--max-new-tokens", str(max_new_tokens),
                *(["--greedy"] if greedy else []), *(["--seed", str(seed)] if seed is not None else []))
    result = json.loads(out.read_text())
    if as_json:
        emit_json(result)
        return
    ft, base = result["fine_tuned"], result["base"]
    click.echo(f"{result['dataset']}: {result['rows']} rows; answers by {result['sampling']}")
    paired = "preference_accuracy" in ft
    extra = f"{'pref. accuracy':>16}{'margin':>10}" if paired else ""
    click.echo(f"{'':<12}{'loss':>10}{'perplexity':>14}{extra}")
    for label, s in (("base", base), ("fine-tuned", ft)):
        extra = f"{s['preference_accuracy']:>16.3f}{s['preference_margin']:>10.3f}" if paired else ""
        click.echo(f"{label:<12}{s['loss']:>10.4f}{s['perplexity']:>14.2f}{extra}")
    if "preference" in result:
        p = result["preference"]
        margin = f", reward margin {p['reward_margin']:.4f}" if "reward_margin" in p else ""
        click.echo(f"{p['stage']} objective (base as reference): loss {p['loss']:.4f}, "
                   f"reward accuracy {p['reward_accuracy']:.3f}{margin}")
    for i, sample in enumerate(result["samples"], 1):
        click.echo(f"\n[{i}] {sample['prompt']}")
        click.echo(f"  reference : {sample['reference']}")
        click.echo(f"  base      : {sample['base']}")
        click.echo(f"  fine-tuned: {sample['fine_tuned']}")
    click.echo(f"\nwritten to {out}")
