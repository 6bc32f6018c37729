"""LlamaFactory's dataset registry: `path/to/dataset_info.json:NAME` as a dataset.

An entry names its file (relative to the registry), its formatting (alpaca or sharegpt), its column
names and, for sharegpt, the keys and role names of its turns (tags). The rows are rewritten into our
alpaca, sharegpt or text shapes (inputs/data/records.py), so a user's registry works unchanged.
LlamaFactory's pretraining entries (only a `prompt` column, like c4_demo) read as plain text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from contract.errors import DatasetError

_ENTRY = re.compile(r"^(?P<file>.*dataset_info\.json):(?P<name>[^/\\]+)$")
# LlamaFactory's alpaca column names -> ours.
_ALPACA = {"prompt": "instruction", "query": "input", "response": "output", "system": "system"}
_ALPACA_DEFAULTS = {"prompt": "instruction", "query": "input", "response": "output"}
_SHAREGPT_DEFAULTS = {"messages": "conversations"}
_TAG_DEFAULTS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
_OUR_ROLE = {"user_tag": "human", "assistant_tag": "gpt", "observation_tag": "observation",
             "function_tag": "function_call", "system_tag": "system"}
_UNSUPPORTED_COLUMNS = {"images": "multimodal", "videos": "multimodal", "audios": "multimodal",
                        "chosen": "preference", "rejected": "preference", "kto_tag": "preference"}


def is_entry(path) -> bool:
    return bool(_ENTRY.match(str(path)))


def entry_file(path) -> Path:
    """The data file a registry entry points to (for cache keys and job records)."""
    return read_entry(path, "auto", None)[0]


def read_entry(path, fmt: str, columns: dict | None) -> tuple[Path, str, None, Callable[[dict], dict]]:
    match = _ENTRY.match(str(path))
    registry, name = Path(match["file"]), match["name"]
    where = f"{registry}:{name}"
    if not registry.is_file():
        raise DatasetError(f"dataset registry {registry} does not exist")
    try:
        entries = json.loads(registry.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{registry}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(entries, dict) or name not in entries:
        names = ", ".join(sorted(entries)) if isinstance(entries, dict) else "none"
        raise DatasetError(f"{registry} has no entry {name!r}; its entries: {names}")
    entry = entries[name]
    if columns:
        raise DatasetError(f"{where}: the registry entry gives the columns; remove dataset.columns from the strategy")
    if "file_name" not in entry:
        raise DatasetError(f"{where}: only local files are read (file_name); download hub datasets "
                           f"({', '.join(k for k in entry if k.endswith('_url')) or 'none given'}) first")
    if entry.get("ranking"):
        raise DatasetError(f"{where}: preference data (ranking: true) is not supported by supervised fine-tuning in this version")
    cols = entry.get("columns", {})
    unsupported = sorted(set(cols) & set(_UNSUPPORTED_COLUMNS))
    if unsupported:
        kinds = sorted({_UNSUPPORTED_COLUMNS[c] for c in unsupported})
        raise DatasetError(f"{where}: columns {unsupported} ({' and '.join(kinds)} data) are not supported in this version")
    formatting = entry.get("formatting", "alpaca")
    if formatting == "alpaca":
        adapt, our_fmt = _alpaca(cols, where)
    elif formatting == "sharegpt":
        adapt, our_fmt = _sharegpt(cols, entry.get("tags", {}), where), "sharegpt"
    else:
        raise DatasetError(f"{where}: formatting {formatting!r} is not one of alpaca, sharegpt")
    if fmt not in ("auto", our_fmt):
        raise DatasetError(f"{where} is {our_fmt} data but dataset.format is {fmt}; set dataset.format: auto")
    return registry.parent / entry["file_name"], our_fmt, None, adapt


def _alpaca(cols: dict, where: str):
    unknown = sorted(set(cols) - set(_ALPACA) - {"history"})
    if unknown:
        raise DatasetError(f"{where}: unknown alpaca columns {unknown}; valid: {', '.join(_ALPACA)}, history")
    mapping = {**_ALPACA_DEFAULTS, **cols}
    if set(cols) == {"prompt"}:  # a pretraining entry: documents in one column
        text = cols["prompt"]
        return (lambda row: {"text": row.get(text)}), "text"
    history = mapping.pop("history", None)

    def adapt(row: dict) -> dict:
        if history and row.get(history):
            raise ValueError(f"alpaca 'history' ({history}) is not supported; write multi-turn rows as sharegpt")
        return {_ALPACA[k]: row[v] for k, v in mapping.items() if row.get(v) is not None}

    return adapt, "alpaca"


def _sharegpt(cols: dict, tags: dict, where: str):
    unknown = sorted(set(cols) - {"messages", "system", "tools"})
    bad_tags = sorted(set(tags) - set(_TAG_DEFAULTS))
    if unknown or bad_tags:
        raise DatasetError(f"{where}: unknown sharegpt columns or tags {unknown + bad_tags}; valid columns: "
                           f"messages, system, tools; tags: {', '.join(_TAG_DEFAULTS)}")
    cols, tags = {**_SHAREGPT_DEFAULTS, **cols}, {**_TAG_DEFAULTS, **tags}
    roles = {tags[k]: ours for k, ours in _OUR_ROLE.items()}

    def turn(t) -> dict:
        if not isinstance(t, dict) or tags["role_tag"] not in t:
            raise ValueError(f"a turn has no {tags['role_tag']!r} key")
        role = t[tags["role_tag"]]
        if role not in roles:
            raise ValueError(f"turn role {role!r} is not one of the entry's tags {', '.join(roles)}")
        return {"from": roles[role], "value": t.get(tags["content_tag"])}

    def adapt(row: dict) -> dict:
        turns = row.get(cols["messages"])
        if not isinstance(turns, list):
            raise ValueError(f"column {cols['messages']!r} must be a list of turns")
        out = {"conversations": [turn(t) for t in turns]}
        for ours in ("system", "tools"):
            if ours in cols and row.get(cols[ours]):
                out[ours] = row[cols[ours]]
        return out

    return adapt
