"""`llamafarm generate`: answer a prompt with a fine-tuned model."""

from __future__ import annotations

import subprocess
import sys

import click

from orchestrator.cli.base import cli


@cli.command()
@click.option("--model", required=True,
              help="A job id, a job folder, a final/ folder, a model folder, an Ollama export folder or a .gguf file.")
@click.option("--prompt", required=True, help="The user message to answer.")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(1, 8192))
@click.option("--temperature", default=None, type=click.FloatRange(0.0, 5.0),
              help="Overrides the strategy's export.ollama.temperature (the Modelfile's, for an export).")
@click.option("--greedy", is_flag=True, help="Always the most likely token (deterministic) instead of sampling.")
@click.option("--seed", default=None, type=click.IntRange(0), help="Sampling seed (default: a fresh one, as Ollama).")
def generate(model, prompt, max_new_tokens, temperature, greedy, seed):
    """Answer a prompt with a fine-tuned model, using the chat template it was trained with and the
    sampling settings its Ollama Modelfile carries (export.ollama: Ollama's defaults unless set).

    \b
    Example:
      llamafarm generate --model tiny_demo-20260101-120000-ab12 --prompt "What are the symptoms of anemia?" --seed 1
    """
    from orchestrator import jobs
    from contract.errors import UserError
    from orchestrator.runners.local import PROJECT_ROOT, trainer_argv, trainer_env

    if not prompt.strip():
        raise UserError("--prompt is empty; give the question to answer, e.g. --prompt \"What is anemia?\"")
    folder = _model_path(model, jobs)
    argv = ["--prompt", prompt, "--max-new-tokens", str(max_new_tokens)]
    argv += ["--temperature", str(temperature)] if temperature is not None else []
    argv += ["--seed", str(seed)] if seed is not None else []
    argv += ["--greedy"] if greedy else []
    # Streamed, not captured: the answer (or the trainer's error line) goes straight to the terminal.
    code = subprocess.call(trainer_argv("generate", str(folder), *argv), cwd=PROJECT_ROOT, env=trainer_env())
    if code:
        sys.exit(code)


def _model_path(model: str, jobs):
    """A GGUF answers through llama.cpp with the template and stop strings embedded at export; an Ollama
    export folder through its model.gguf and its Modelfile's settings."""
    from pathlib import Path

    path = Path(model).expanduser().resolve()
    if model.endswith(".gguf"):
        return path
    if (path / "model.gguf").is_file() and (path / "Modelfile").is_file():
        return path / "model.gguf"
    return jobs.export_gguf(path) or jobs.model_folder(model)  # another export folder: its one GGUF
