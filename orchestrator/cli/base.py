"""The root of the `llamafarm` CLI and what its commands share: user errors shown without a
traceback, the --strategy-file option, JSON output, loading a strategy with --set overrides."""

from __future__ import annotations

import json

import click

from contract.errors import UserError

STRATEGY_FILES = click.option(
    "--strategy-file",
    "strategy_files",
    multiple=True,
    type=click.Path(),
    help="Extra strategy YAML file or folder (repeatable; also $LLAMAFARM_STRATEGIES).",
)


def emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


class _UserFacingError(click.ClickException):
    exit_code = 1


# The exit-code rule (README, Guarantees): 0 done; 1 anything refused or failed, Click's usage errors
# (a missing option, an unknown command) included, each as one `Error: ...` line; 130 interrupted (Ctrl-C).
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # the shell's convention: 128 + SIGINT


class _Root(click.Group):
    """Turns a UserError anywhere below into one clear line and exit 1, never a traceback; gives
    Click's own usage errors the same exit code."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            exc.exit_code = EXIT_ERROR
            raise

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise _UserFacingError(str(exc)) from None
        except click.UsageError as exc:
            exc.exit_code = EXIT_ERROR
            raise
        except KeyboardInterrupt:  # Click would print "Aborted!" and exit 1
            click.echo("\ninterrupted (Ctrl-C)", err=True)
            ctx.exit(EXIT_INTERRUPTED)


@click.group(cls=_Root, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llamafarm", message="llamafarm %(version)s")
def cli():
    """Fine-tune open LLMs on your own data, on CUDA, Apple MPS or plain CPU.

    \b
    Example:
      llamafarm finetune start --strategy tiny_demo --dataset demos/datasets/medical_qa.jsonl
    """


@cli.group()
def finetune():
    """Strategies, training jobs and their progress.

    \b
    Example:
      llamafarm finetune strategies list
    """


# --- strategies ----------------------------------------------------------------------------------



def load_strategy(name: str, assignments: tuple[str, ...], strategy_files: tuple[str, ...]):
    """(entry, validated strategy, applied overrides) for a strategy name and its --set values.

    A base model given as a folder relative to where the user stands is pinned as an absolute path:
    the trainer runs in another working folder."""
    from pathlib import Path

    from orchestrator import strategies as strat

    entry, _ = strat.get(name, strategy_files)
    raw, overrides = strat.apply_overrides(entry.raw, assignments)
    strategy = strat.validate(name, raw, str(entry.source) + (" with --set" if overrides else ""))
    base = strategy.cfg.base_model
    from inputs.models.job_output import base_folder
    from orchestrator.runners.local import run_trainer

    # A previous job's output (job:<id> or its folder) becomes a plain model folder (LoRA merged in by
    # the trainer's process: torch never loads in the CLI).
    job_base = base_folder(base.huggingface_id, lambda final, target: run_trainer("merge-base", str(final), str(target)),
                           echo=lambda m: click.echo(m, err=True))
    if job_base:
        base.huggingface_id = str(job_base)
    elif Path(base.huggingface_id).expanduser().exists():
        base.huggingface_id = str(Path(base.huggingface_id).expanduser().resolve())
    return entry, strategy, overrides
