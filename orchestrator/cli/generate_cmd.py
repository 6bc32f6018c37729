"""`llamafarm generate`: answer a prompt with a fine-tuned model."""

from __future__ import annotations

import subprocess
import sys

import click

from orchestrator.cli.base import cli


@cli.command()
@click.option("--model", required=True, help="A job id, a job folder, a final/ folder, or an exported .gguf file.")
@click.option("--prompt", required=True, help="The user message to answer.")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(1, 8192))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0.0, 5.0),
              help="0 is greedy (deterministic).")
def generate(model, prompt, max_new_tokens, temperature):
    """Answer a prompt with a fine-tuned model, using the chat template it was trained with.

    \b
    Example:
      llamafarm generate --model tiny_demo-20260101-120000-ab12 --prompt "What are the symptoms of anemia?"
    """
    from pathlib import Path

    from orchestrator import jobs
    from contract.errors import UserError
    from orchestrator.runners.local import PROJECT_ROOT, trainer_argv, trainer_env

    if not prompt.strip():
        raise UserError("--prompt is empty; give the question to answer, e.g. --prompt \"What is anemia?\"")
    # A GGUF answers through llama.cpp with the template and stop strings embedded at export.
    gguf = jobs.export_gguf(Path(model).expanduser().resolve())  # an export folder: its one GGUF
    if gguf:
        folder = gguf
    else:
        folder = Path(model).expanduser().resolve() if model.endswith(".gguf") else jobs.model_folder(model)
    # Streamed, not captured: the answer (or the trainer's error line) goes straight to the terminal.
    argv = trainer_argv("generate", str(folder), "--prompt", prompt,
                        "--max-new-tokens", str(max_new_tokens), "--temperature", str(temperature))
    code = subprocess.call(argv, cwd=PROJECT_ROOT, env=trainer_env())
    if code:
        sys.exit(code)
