"""Preference data: answers to the same prompt marked better or worse, read with file:line errors.

No torch here, so the host CLI checks a preference dataset before it starts a job. Formats (one
registry; `dataset.format` picks one, or `auto` detects it from the rows' keys):
    preference           {"prompt", "chosen", "rejected"}: strings, or message lists (the prompt's
                         list ends with a user turn; chosen and rejected hold one assistant message)
    sharegpt_preference  {"conversations": [{"from", "value"}, ...], "chosen": {"from": "gpt", "value"},
                         "rejected": {...}, "system" (optional)}: LlamaFactory's ShareGPT pairs
    kto                  {"prompt", "completion", "label": true|false}: one answer, good or bad
Pairs also train stage kto: each pair gives a good and a bad answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from contract.errors import DatasetError, UserError
from inputs.data.records import ROLES, SHAREGPT_ROLES, _raw_rows, parse_row, raise_row_problems


@dataclass(frozen=True)
class Pair:
    prompt: tuple[dict, ...]
    chosen: str
    rejected: str
    where: str


@dataclass(frozen=True)
class Unpaired:
    prompt: tuple[dict, ...]
    completion: str
    desirable: bool
    where: str


def _keys(row: dict, required: tuple[str, ...], optional: tuple[str, ...], fmt: str) -> None:
    missing = [k for k in required if row.get(k) is None]
    if missing:
        raise ValueError(f"{fmt} row is missing {missing[0]!r}")
    extra = set(row) - set(required) - set(optional)
    if extra:
        raise ValueError(f"unexpected keys {sorted(extra)} for a {fmt} row ({', '.join(required + optional)})")


def _prompt(value, key: str = "prompt") -> tuple[dict, ...]:
    """A prompt: a string (one user turn) or a message list that ends with a user turn."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{key!r} is empty")
        return ({"role": "user", "content": value},)
    if not isinstance(value, list) or not value:
        raise ValueError(f"{key!r} must be a string or a non-empty list of messages")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or set(m) != {"role", "content"} or m["role"] not in ROLES \
                or not isinstance(m["content"], str):
            raise ValueError(f"{key}[{i}] must be an object with a role ({', '.join(ROLES)}) and a string content")
        if m["role"] == "system" and i != 0:
            raise ValueError(f"{key}[{i}]: a system message may only come first")
        messages.append({"role": m["role"], "content": m["content"]})
    if messages[-1]["role"] != "user":
        raise ValueError(f"{key!r} must end with a user turn (the answers are the assistant's reply to it)")
    return tuple(messages)


def _answer(value, key: str) -> str:
    """An answer: a string, or a list holding one assistant message (TRL's conversational form)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        if value[0].get("role") != "assistant" or set(value[0]) != {"role", "content"}:
            raise ValueError(f"{key}[0] must be {{'role': 'assistant', 'content': ...}}")
        value = value[0]["content"]
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string or a list with one assistant message")
    if not value.strip():
        raise ValueError(f"{key!r} is empty")
    return value


def _preference(row: dict) -> Pair:
    _keys(row, ("prompt", "chosen", "rejected"), (), "preference")
    return Pair(_prompt(row["prompt"]), _answer(row["chosen"], "chosen"), _answer(row["rejected"], "rejected"), "")


def _sharegpt_answer(value, key: str) -> str:
    if not isinstance(value, dict) or set(value) != {"from", "value"} or SHAREGPT_ROLES.get(value["from"]) != "assistant":
        raise ValueError(f"{key!r} must be an object {{'from': 'gpt', 'value': ...}}")
    return _answer(value["value"], f"{key}.value")


def _sharegpt_preference(row: dict) -> Pair:
    _keys(row, ("conversations", "chosen", "rejected"), ("system",), "sharegpt_preference")
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise ValueError("'conversations' must be a non-empty list")
    messages = []
    if row.get("system") is not None:
        if not isinstance(row["system"], str):
            raise ValueError("'system' must be a string")
        messages.append({"role": "system", "content": row["system"]})
    for i, m in enumerate(turns):
        if not isinstance(m, dict) or set(m) != {"from", "value"} or m["from"] not in SHAREGPT_ROLES \
                or not isinstance(m["value"], str):
            raise ValueError(f"conversations[{i}] must be an object with 'from' ({', '.join(SHAREGPT_ROLES)}) "
                             "and a string 'value'")
        messages.append({"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]})
    prompt = _prompt(messages, "conversations")
    return Pair(prompt, _sharegpt_answer(row["chosen"], "chosen"), _sharegpt_answer(row["rejected"], "rejected"), "")


def _kto(row: dict) -> Unpaired:
    _keys(row, ("prompt", "completion", "label"), (), "kto")
    if not isinstance(row["label"], bool):
        raise ValueError(f"'label' must be true or false, got {row['label']!r}")
    return Unpaired(_prompt(row["prompt"]), _answer(row["completion"], "completion"), row["label"], "")


PREFERENCE_READERS: dict[str, Callable[[dict], Pair | Unpaired]] = {
    "preference": _preference,
    "sharegpt_preference": _sharegpt_preference,
    "kto": _kto,
}


def detect_preference_format(row: dict) -> str | None:
    if "chosen" in row or "rejected" in row:
        return "sharegpt_preference" if "conversations" in row else "preference"
    if "label" in row and "completion" in row:
        return "kto"
    return None


def read_preference_dataset(path: str | Path, fmt: str = "auto", columns: dict[str, str] | None = None):
    """Pairs or unpaired answers; raise DatasetError naming file:line for each bad row (the first ten)."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist")
    rename = {source: canonical for canonical, source in (columns or {}).items()}
    problems: list[str] = []
    out, first_of_format = [], {}
    for where, row in _raw_rows(path, problems):
        if not isinstance(row, dict):
            problems.append(f"{where}: expected an object, got {type(row).__name__}")
            continue
        row = {rename.get(k, k): v for k, v in row.items()}
        try:
            row_format, item = parse_row(row, fmt, detect_preference_format, PREFERENCE_READERS, "not preference data")
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        first_of_format.setdefault(row_format, where)
        out.append(type(item)(**{**item.__dict__, "where": where}))
    raise_row_problems(path, problems, first_of_format)
    if not out:
        raise DatasetError(f"dataset {path} has no rows; add rows in one of the formats {', '.join(PREFERENCE_READERS)}")
    return out


def as_stage_items(items: list, stage: str, where: str) -> list:
    """Pairs for dpo/orpo; unpaired answers for kto (a pair gives one good and one bad answer)."""
    paired = isinstance(items[0], Pair)
    if stage == "kto":
        if not paired:
            return items
        return [Unpaired(p.prompt, answer, good, p.where) for p in items
                for answer, good in ((p.chosen, True), (p.rejected, False))]
    if not paired:
        raise UserError(f"{where}: method.stage {stage} needs chosen/rejected pairs, but the file holds single "
                        "answers with a label (format kto); use method.stage: kto")
    return items


def read_for_stage(path: str | Path, cfg) -> list:
    """The dataset as conversations, for the host's checks, token estimates and verify prompts.

    A preference stage gives one conversation per answer (prompt + chosen, prompt + rejected, or the
    KTO answer and the other row's answer it is compared with), as the trainer runs them."""
    from inputs.data.records import Conversation, read_dataset

    d, stage = cfg.dataset, cfg.method.stage
    if stage == "sft":
        return read_dataset(path, d.format, d.columns, d.replace)
    items = as_stage_items(read_preference_dataset(path, d.format, d.columns), stage, str(path))
    fmt = "kto" if isinstance(items[0], Unpaired) else "preference"

    def conv(item, answer):
        return Conversation((*item.prompt, {"role": "assistant", "content": answer}), item.where, fmt)

    if fmt == "kto":
        return [conv(it, a) for k, it in enumerate(items)
                for a in (it.completion, items[(k + 1) % len(items)].completion)]
    return [conv(it, a) for it in items for a in (it.chosen, it.rejected)]


def first_row(path: Path):
    from inputs.data.llamafactory_info import is_entry

    if is_entry(path) or not Path(path).exists():
        return None
    for _, row in _raw_rows(Path(path), []):
        return row if isinstance(row, dict) else None
    return None


def read_eval_data(path: str | Path, cfg) -> tuple[str, list]:
    """What `evaluate` scores a model on, by the file's own rows (so an SFT job can be scored on pairs
    and a preference job on conversations): ("sft", conversations), ("pairs", [Pair]) or
    ("kto", [Unpaired]). The job's format and columns apply when the file holds the same kind of data."""
    from contract.strategy import PREFERENCE_FORMATS
    from inputs.data.records import read_dataset

    d, stage = cfg.dataset, cfg.method.stage
    first = first_row(path) or {}
    if d.format in PREFERENCE_FORMATS and d.columns:
        first = {{source: canonical for canonical, source in d.columns.items()}.get(k, k): v for k, v in first.items()}
    detected = detect_preference_format(first)
    if detected is None:
        sft_format = d.format not in PREFERENCE_FORMATS
        return "sft", read_dataset(path, d.format if sft_format else "auto", d.columns if sft_format else None,
                                   d.replace)
    own = d.format in ("auto", detected)  # another preference format than the job's: read by its own keys
    items = read_preference_dataset(path, d.format if own else "auto", d.columns if own else None)
    if isinstance(items[0], Pair):
        return "pairs", items
    if stage != "kto":
        raise UserError(f"{path} holds single answers with a label (format kto): they score a kto job only, and this "
                        f"model is method.stage {stage}; evaluate it on chosen/rejected pairs (format preference or "
                        "sharegpt_preference) or on conversations")
    return "kto", items
