"""`llamafarm finetune strategies list|show|validate`."""

from __future__ import annotations

from pathlib import Path

import click

from contract.errors import UserError
from orchestrator.cli.base import STRATEGY_FILES, emit_json, finetune


@finetune.group()
def strategies():
    """List, show and validate strategies.

    \b
    Example:
      llamafarm finetune strategies show tiny_demo
    """


@strategies.command("list")
@STRATEGY_FILES
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def strategies_list(strategy_files, as_json):
    """List the strategies with their model, method and device.

    \b
    Example:
      llamafarm finetune strategies list --json
    """
    from orchestrator import strategies as strat

    # Listing shows the files as written (a key left to the schema's default shows as "default";
    # `strategies show` resolves it). The user's own files are validated so a broken strategy is never
    # listed as if it were fine; the shipped ones are checked by CI, so a plain list stays instant.
    rows = []
    for name, entry in sorted(strat.discover(strategy_files).items()):
        problems = [] if entry.source == strat.DEFAULT_STRATEGIES else _problems(strat, entry)
        rows.append(
            {
                "name": name,
                "description": _raw(entry.raw, "description") or "",
                "base_model": _raw(entry.raw, "fine_tuner", "config", "base_model", "huggingface_id"),
                "base_model_name": _raw(entry.raw, "fine_tuner", "config", "base_model", "name"),
                "method": _raw(entry.raw, "fine_tuner", "config", "method", "type") or "default",
                "device": _raw(entry.raw, "fine_tuner", "config", "device") or "default",
                "source": str(entry.source),
                "valid": not problems,
                "problems": problems,
            }
        )
    if as_json:
        emit_json(rows)
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        line = f"{r['name']:<{width}}  {r['method']!s:<7} {r['device']!s:<7}  {r['base_model'] or '-'}  {r['description']}"
        if not r["valid"]:
            n = len(r["problems"])
            line = (f"{r['name']:<{width}}  INVALID ({n} problem{'s' if n != 1 else ''}; "
                    f"`llamafarm finetune strategies validate {r['source']}`)")
        click.echo(line.rstrip())


def _problems(strat, entry) -> list[str]:
    from contract.errors import StrategyError

    try:
        strat.validate(entry.name, entry.raw, str(entry.source))
        return []
    except StrategyError as exc:
        return exc.problems


def _raw(data, *path):
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


@strategies.command("show")
@click.argument("name")
@STRATEGY_FILES
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def strategies_show(name, strategy_files, as_json):
    """Show one strategy with every default filled in.

    \b
    Example:
      llamafarm finetune strategies show cpu_fine_tuning
    """
    import yaml

    from contract.strategy import resolved_dict
    from orchestrator import strategies as strat

    entry, strategy = strat.get(name, strategy_files)
    data = resolved_dict(strategy)
    if as_json:
        emit_json({"name": name, "source": str(entry.source), "strategy": data})
        return
    click.echo(f"# {name} from {entry.source}")
    click.echo(yaml.safe_dump({name: data}, sort_keys=False).rstrip())


@strategies.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path())
def strategies_validate(files):
    """Check strategy files (or folders of them); report every problem with its path.

    \b
    Example:
      llamafarm finetune strategies validate strategies/ my_strategy.yaml
    """
    from contract.errors import StrategyError
    from orchestrator import strategies as strat

    failures = 0
    for item in files:
        for path in strat.yaml_files(Path(item)):
            for name, raw in strat.read_strategy_file(path).items():
                try:
                    strat.validate(name, raw, str(path))
                    click.echo(f"ok      {name} ({path})")
                except StrategyError as exc:
                    failures += 1
                    click.echo(str(exc), err=True)  # "invalid strategy NAME in FILE (N problems): ..."
    if failures:
        raise UserError(f"{failures} invalid strateg{'y' if failures == 1 else 'ies'}")


# --- jobs ----------------------------------------------------------------------------------------
