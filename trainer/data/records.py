"""Reading a dataset file into conversations, with file:line for every problem.

Pure Python (no torch), so the host CLI checks a dataset before it starts a job. Every row becomes a
list of messages ({"role", "content"}); the chat template turns that into text later.

Formats (one registry; `dataset.format` in the strategy picks one or `auto` detects per row):
    alpaca   {"instruction": ..., "input": ... (optional), "output": ...}
    chat     {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from contract.errors import DatasetError

ROLES = ("system", "user", "assistant")
_MAX_REPORTED = 10


@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict, ...]
    line: int


def _alpaca(row: dict) -> list[dict]:
    for key in ("instruction", "output"):
        if key not in row:
            raise ValueError(f"alpaca row is missing {key!r}")
    for key in ("instruction", "input", "output"):
        if key in row and not isinstance(row[key], str):
            raise ValueError(f"{key!r} must be a string, got {type(row[key]).__name__}")
    extra = set(row) - {"instruction", "input", "output"}
    if extra:
        raise ValueError(f"unexpected keys {sorted(extra)} for an alpaca row (instruction, input, output)")
    if not row["instruction"].strip() or not row["output"].strip():
        raise ValueError("empty instruction or output")
    prompt = row["instruction"]
    if row.get("input", "").strip():
        prompt = f"{prompt}\n\n{row['input']}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def _chat(row: dict) -> list[dict]:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be an object with exactly 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}].content must be a string")
        if m["role"] == "system" and i != 0:
            raise ValueError(f"messages[{i}]: a system message may only come first")
        out.append({"role": m["role"], "content": m["content"]})
    turns = [m["role"] for m in out if m["role"] != "system"]
    if "assistant" not in turns:
        raise ValueError("conversation has no assistant turn, so nothing to learn from")
    if any(a == b for a, b in zip(turns, turns[1:])) or turns[0] != "user":
        raise ValueError("turns must alternate user, assistant, user, ... starting with user")
    if any(not m["content"].strip() for m in out if m["role"] == "assistant"):
        raise ValueError("an assistant message is empty")
    return out


FORMATS: dict[str, Callable[[dict], list[dict]]] = {"alpaca": _alpaca, "chat": _chat}


def detect_format(row: dict) -> str | None:
    if "messages" in row:
        return "chat"
    if "instruction" in row or "output" in row:
        return "alpaca"
    return None


def read_dataset(path: str | Path, fmt: str = "auto") -> list[Conversation]:
    """Read a JSONL dataset; raise DatasetError naming file:line for each bad row (first ten)."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist")
    if path.is_dir():
        raise DatasetError(f"dataset {path} is a folder; give a .jsonl file")
    if fmt != "auto" and fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; valid: auto, {', '.join(FORMATS)}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a BOM is tolerated
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    problems: list[str] = []
    conversations: list[Conversation] = []
    seen_formats: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            continue
        row_format = fmt if fmt != "auto" else detect_format(row)
        if row_format is None:
            problems.append(
                f"{path}:{number}: unrecognised row with keys {sorted(row)}; expected alpaca "
                "(instruction, input, output) or chat (messages)"
            )
            continue
        try:
            messages = FORMATS[row_format](row)
        except ValueError as exc:
            problems.append(f"{path}:{number}: {exc}")
            continue
        seen_formats.add(row_format)
        conversations.append(Conversation(tuple(messages), number))
    if len(seen_formats) > 1 and fmt == "auto":
        problems.append(f"{path}: mixes formats ({', '.join(sorted(seen_formats))}); use one format per file")
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:_MAX_REPORTED])
        more = f"\n  ... and {len(problems) - _MAX_REPORTED} more" if len(problems) > _MAX_REPORTED else ""
        raise DatasetError(f"dataset {path} has {len(problems)} bad row(s):\n{shown}{more}")
    if not conversations:
        raise DatasetError(f"dataset {path} has no rows; add JSON lines in alpaca or chat format")
    return conversations
