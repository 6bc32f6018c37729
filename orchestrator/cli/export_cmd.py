"""`llamafarm finetune export`: merged weights, GGUF, GGUF LoRA or an Ollama folder, verified."""

from __future__ import annotations

import subprocess
import sys

import click

from contract.export_options import FORMATS, QUANTIZATIONS
from orchestrator.cli.base import finetune


@finetune.command("export")
@click.option("--model-path", "model", required=True, help="A job id, a job folder, or a final/ folder.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="What to write (default: the strategy's export.format).")
@click.option("--quantization", type=click.Choice(QUANTIZATIONS), default=None,
              help="GGUF weight type, or merged precision (default: the strategy's export section).")
@click.option("--output", type=click.Path(), default=None, help="Folder to write (default: <job>/exports/<format>-<quantization>).")
@click.option("--name", default=None, help="Model name; with --format ollama and `ollama` on PATH, runs `ollama create NAME`.")
@click.option("--force", is_flag=True, help="Replace an earlier export in the output folder (one holding export_report.json); other folders are refused.")
@click.option("--json", "as_json", is_flag=True, help="Print the export report as JSON.")
def export(model, fmt, quantization, output, name, force, as_json):
    """Export a trained model; every GGUF is loaded back with llama.cpp and compared with PyTorch
    (tokenization, logits, greedy text) before it is put in place; the figures go to export_report.json.

    \b
    Example:
      llamafarm finetune export --model-path tiny_demo-20260101-120000-ab12 --format ollama --name tiny-medical
    """
    from pathlib import Path

    from orchestrator import jobs
    from orchestrator.runners.local import PROJECT_ROOT, trainer_argv, trainer_env

    folder = jobs.model_folder(model)
    args = ["export", str(folder)]
    for flag, value in (("--format", fmt), ("--quantization", quantization), ("--name", name)):
        if value:
            args += [flag, value]
    if output:
        args += ["--output", str(Path(output).expanduser().resolve())]
    if force:
        args.append("--force")
    if as_json:
        args.append("--json")
    if not as_json:
        # Inherited stdout: progress bars and decisions reach the terminal as they happen.
        code = subprocess.call(trainer_argv(*args), cwd=PROJECT_ROOT, env=trainer_env())
        if code:
            sys.exit(code)
        return
    # --json: the trainer's last stdout line is the report; every line before it streams to stderr.
    proc = subprocess.Popen(trainer_argv(*args), cwd=PROJECT_ROOT, env=trainer_env(), stdout=subprocess.PIPE, text=True)
    last = None
    for line in proc.stdout:
        if last is not None:
            click.echo(last, nl=False, err=True)
        last = line
    code = proc.wait()
    if code or last is None:
        if last is not None:
            click.echo(last, nl=False, err=True)
        sys.exit(code or 1)
    click.echo(last, nl=False)
