"""Finding, loading, checking and overriding strategies.

Strategy files are YAML mappings of `name -> strategy`. They come from the shipped
`strategies/default_strategies.yaml`, then from every file or folder named by `--strategy-file` and by
`LLAMAFARM_STRATEGIES` (os.pathsep separated); a later file may redefine a name, which is reported.
"""

from __future__ import annotations

import difflib
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from contract.errors import StrategyError, UserError
from contract.paths import PROJECT_ROOT

if TYPE_CHECKING:
    from contract.strategy import Strategy

# contract.strategy (pydantic) is imported where a strategy is validated, not at module import:
# `strategies list` and `jobs` only read files and must answer at once.

DEFAULT_STRATEGIES = PROJECT_ROOT / "strategies" / "default_strategies.yaml"
ENV_VAR = "LLAMAFARM_STRATEGIES"


@dataclass
class StrategyEntry:
    name: str
    source: Path
    raw: dict


def yaml_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    if path.is_file():
        return [path]
    raise UserError(f"strategy path {path} does not exist (from --strategy-file or ${ENV_VAR})")


def read_strategy_file(path: Path) -> dict:
    """Parse one strategy file safely; its top level must map names to strategies."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f":{where.line + 1}" if where else ""
        raise UserError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: expected a mapping of strategy names to strategies at the top level")
    for name, body in data.items():
        if not isinstance(name, str):
            raise UserError(f"{path}: strategy name {name!r} must be a string")
    return data


def discover(extra_paths: tuple[str, ...] = ()) -> dict[str, StrategyEntry]:
    paths = [DEFAULT_STRATEGIES]
    env = os.environ.get(ENV_VAR, "")
    for item in [*env.split(os.pathsep), *extra_paths]:
        if item.strip():
            paths.extend(yaml_files(Path(item).expanduser()))
    entries: dict[str, StrategyEntry] = {}
    for path in paths:
        for name, raw in read_strategy_file(path).items():
            entries[name] = StrategyEntry(name, path, raw)
    return entries


def registry_problems(strategy: Strategy) -> list[str]:
    """Checks of names that live in registries (backends, runners, templates), with their paths."""
    from contract.chat_templates import TEMPLATES
    from orchestrator.backends import BACKENDS
    from orchestrator.runners import RUNNERS

    cfg = strategy.cfg
    problems = []
    if strategy.fine_tuner.type not in BACKENDS:
        problems.append(f"fine_tuner.type: unknown backend {strategy.fine_tuner.type!r}; valid: {', '.join(BACKENDS)}")
    if cfg.runner != "auto" and cfg.runner not in RUNNERS:
        problems.append(f"fine_tuner.config.runner: unknown runner {cfg.runner!r}; valid: auto, {', '.join(RUNNERS)}")
    if strategy.fine_tuner.type == "llamafactory":
        from contract.llamafactory import problems as llamafactory_problems

        problems.extend(llamafactory_problems(strategy))
    elif cfg.runner == "llamafactory":
        problems.append("fine_tuner.config.runner: llamafactory only runs fine_tuner.type: llamafactory")
    if cfg.dataset.template != "auto" and cfg.dataset.template not in TEMPLATES:
        problems.append(
            f"fine_tuner.config.dataset.template: unknown template {cfg.dataset.template!r}; "
            f"valid: auto, {', '.join(sorted(TEMPLATES))}"
        )
    if cfg.method.type == "qlora" and cfg.device in ("mps", "cpu") and not cfg.method.fallback_to_lora:
        problems.append(
            f"fine_tuner.config.method.type: qlora needs CUDA but device is {cfg.device}; "
            "use lora, or set method.fallback_to_lora: true"
        )
    return problems


def validate(name: str, raw: object, source: str) -> Strategy:
    """Schema plus registry checks; every problem reported at once."""
    from contract.strategy import parse_strategy

    label = f"{name!r} in {source}"
    strategy = parse_strategy(label, raw)
    problems = registry_problems(strategy)
    if problems:
        raise StrategyError(label, problems)
    return strategy


def get(name: str, extra_paths: tuple[str, ...] = ()) -> tuple[StrategyEntry, Strategy]:
    entries = discover(extra_paths)
    if name not in entries:
        close = difflib.get_close_matches(name, entries, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(
            f"unknown strategy {name!r}; {hint}valid: {', '.join(sorted(entries))} "
            "(`llamafarm finetune strategies list`)"
        )
    entry = entries[name]
    return entry, validate(name, entry.raw, str(entry.source))


# --- --set overrides -----------------------------------------------------------------------------

# Paths are relative to fine_tuner.config unless they start at the strategy's top level.
_TOP_LEVEL = ("description", "fine_tuner")


def apply_overrides(raw: dict, assignments: tuple[str, ...]) -> tuple[dict, dict]:
    """Apply `path=value` assignments to a copy of the raw strategy.

    Values are parsed as YAML scalars ("1e-4", "true", "[q_proj, v_proj]"); the schema then checks
    them. A path must name a key the schema knows, so a typo never silently adds a setting.
    """
    import copy

    from contract.strategy import Strategy as _Schema

    data = copy.deepcopy(raw)
    applied: dict[str, object] = {}
    for item in assignments:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected PATH=VALUE, e.g. --set training_args.learning_rate=1e-4")
        path, _, text = item.partition("=")
        path = path.strip()
        parts = path.split(".")
        if not path or any(not p for p in parts):
            raise UserError(f"--set {item!r}: empty key in path {path!r}")
        if parts[0] not in _TOP_LEVEL:
            parts = ["fine_tuner", "config", *parts]
        _check_schema_path(_Schema, parts, item)
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        node = data
        for key in parts[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[parts[-1]] = value
        applied[".".join(parts)] = value
    return data, applied


def _check_schema_path(model, parts: list[str], item: str) -> None:
    from pydantic import BaseModel

    current = model
    for i, key in enumerate(parts):
        fields = current.model_fields
        if key not in fields:
            where = ".".join(parts[:i]) or "the strategy"
            close = difflib.get_close_matches(key, fields, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(
                f"--set {item!r}: {where} has no key {key!r}{hint}; valid keys there: {', '.join(fields)}"
            )
        annotation = fields[key].annotation
        is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if i < len(parts) - 1 and typing.get_origin(annotation) is dict:
            # A mapping's keys are the user's (dataset.replace.name); the schema checks the value.
            if i == len(parts) - 2:
                return
            raise UserError(f"--set {item!r}: {'.'.join(parts[: i + 2])} is a value, not a section")
        if i < len(parts) - 1:
            if not is_model:
                raise UserError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
            current = annotation
        elif is_model:
            raise UserError(f"--set {item!r}: {'.'.join(parts)} is a section; set one of its keys instead")
