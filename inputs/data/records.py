"""Reading a dataset into conversations, with file:line (or row) for every problem.

No torch here, so the host CLI checks a dataset before it starts a job. Every row becomes a
Conversation: a list of messages ({"role", "content"}) for the chat template, or plain text.

Files: JSONL and JSON arrays are read here, line by line, so every error names its line; CSV, Parquet
and Hugging Face dataset folders (`save_to_disk`) go through the `datasets` library.

Formats (one registry; `dataset.format` picks one, or `auto` detects it from the rows' keys):
    alpaca             {"instruction", "input" (optional), "output", "system" (optional)}
    chat               {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content", "tool_calls"}, ...],
                        "tools" (optional), "system" (optional)}: OpenAI messages, tool calls included
    sharegpt           {"conversations": [{"from": "system"|"human"|"gpt"|"function_call"|"observation", "value"}, ...],
                        "tools" (optional), "system" (optional)}: LlamaFactory's ShareGPT
    prompt_completion  {"prompt", "completion", "system" (optional)}
    text               {"text"}: raw text, every token trained, no template
`dataset.columns` renames a file's own column names to these (e.g. {instruction: question}); a
LlamaFactory `dataset_info.json:NAME` gives the file, format and columns itself (inputs/data/llamafactory_info.py).
Rows of kinds this version cannot train (preference pairs, multimodal) are refused by name (_UNSUPPORTED).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from contract.errors import DatasetError
from inputs.data import tools as tool_rows
from inputs.data.placeholders import fill_placeholders

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_MAX_REPORTED = 10
MAX_LINE_BYTES = 4 * 1024 * 1024  # one row this long is almost surely a broken file, not data
# Python's JSON parser recurses once per level; a row nested past its limit is a broken file, not data.
_TOO_DEEP = "not valid JSON for a dataset (nested too deeply: lists or objects inside each other past Python's limit)"


@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict, ...]
    where: str
    """file:line or file row N, for messages about this row."""
    format: str
    text: str | None = None
    """Set for plain-text rows, which skip the chat template."""
    tools: tuple[dict, ...] = ()
    """Tool definitions offered to the model ({"type": "function", "function": {...}}), for the template."""


def _strings(row: dict, keys: tuple[str, ...], required: tuple[str, ...], fmt: str) -> None:
    for key in required:
        if key not in row or row[key] is None:
            raise ValueError(f"{fmt} row is missing {key!r}")
    for key in keys:
        if key in row and row[key] is not None and not isinstance(row[key], str):
            raise ValueError(f"{key!r} must be a string, got {type(row[key]).__name__}")
    extra = set(row) - set(keys)
    if extra:
        raise ValueError(f"unexpected keys {sorted(extra)} for a {fmt} row ({', '.join(keys)})")


def _with_system(row: dict, messages: list[dict]) -> list[dict]:
    """A per-row `system` column becomes the conversation's system message."""
    system = row.get("system")
    if system is None or not system.strip():
        return messages
    if messages and messages[0]["role"] == "system":
        raise ValueError("the row has both a 'system' column and a system message; keep one")
    return [{"role": "system", "content": system}, *messages]


def _alpaca(row: dict) -> list[dict]:
    _strings(row, ("instruction", "input", "output", "system"), ("instruction", "output"), "alpaca")
    if not row["instruction"].strip() or not row["output"].strip():
        raise ValueError("empty instruction or output")
    prompt = row["instruction"]
    if (row.get("input") or "").strip():
        prompt = f"{prompt}\n\n{row['input']}"
    return _with_system(row, [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}])


def _prompt_completion(row: dict) -> list[dict]:
    _strings(row, ("prompt", "completion", "system"), ("prompt", "completion"), "prompt_completion")
    if not row["prompt"].strip() or not row["completion"].strip():
        raise ValueError("empty prompt or completion")
    return _with_system(row, [{"role": "user", "content": row["prompt"]},
                              {"role": "assistant", "content": row["completion"]}])


def _check_turns(messages: list[dict]) -> list[dict]:
    for i, m in enumerate(messages):
        if m["role"] == "system" and i != 0:
            raise ValueError(f"turn {i}: a system message may only come first")
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if "assistant" not in turns:
        raise ValueError("conversation has no assistant turn, so nothing to learn from")
    if turns[0] != "user" or any(a == b for a, b in zip(turns, turns[1:])):
        raise ValueError("turns must alternate user, assistant, user, ... starting with user")
    if any(not m["content"].strip() for m in messages if m["role"] == "assistant"):
        raise ValueError("an assistant message is empty")
    return messages


def _turn_list(row: dict, key: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[dict]:
    if set(row) - {key}:
        raise ValueError(f"unexpected keys {sorted(set(row) - {key})} beside {key!r}")
    items = row.get(key)
    if not isinstance(items, list) or not items:
        raise ValueError(f"{key!r} must be a non-empty list")
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict) or set(m) != {role_key, text_key}:
            raise ValueError(f"{key}[{i}] must be an object with exactly {role_key!r} and {text_key!r}")
        if m[role_key] not in roles:
            raise ValueError(f"{key}[{i}].{role_key} {m[role_key]!r} is not one of {', '.join(roles)}")
        if not isinstance(m[text_key], str):
            raise ValueError(f"{key}[{i}].{text_key} must be a string")
        out.append({"role": roles[m[role_key]], "content": m[text_key]})
    return _check_turns(out)


def _chat(row: dict) -> list[dict] | tuple[list[dict], list[dict]]:
    if tool_rows.uses_tools(row, "messages"):
        messages, tools = tool_rows.chat_row(_check_system_column(row, "messages"))
        return _with_system(row, messages), tools
    return _with_system(row, _turn_list(_check_system_column(row, "messages"), "messages", "role", "content",
                                        {r: r for r in ROLES}))


def _sharegpt(row: dict) -> list[dict] | tuple[list[dict], list[dict]]:
    if tool_rows.uses_tools(row, "conversations"):
        messages, tools = tool_rows.sharegpt_row(_check_system_column(row, "conversations"))
        return _with_system(row, messages), tools
    return _with_system(row, _turn_list(_check_system_column(row, "conversations"), "conversations", "from", "value",
                                        SHAREGPT_ROLES))


def _check_system_column(row: dict, key: str) -> dict:
    """The row without its optional `system` column (checked here, added by _with_system)."""
    if row.get("system") is not None and not isinstance(row["system"], str):
        raise ValueError(f"'system' must be a string, got {type(row['system']).__name__}")
    return {k: v for k, v in row.items() if k != "system"}


def _text(row: dict) -> str:
    _strings(row, ("text",), ("text",), "text")
    if not row["text"].strip():
        raise ValueError("empty text")
    return row["text"]


FORMATS: dict[str, Callable[[dict], list[dict] | str]] = {
    "alpaca": _alpaca,
    "chat": _chat,
    "sharegpt": _sharegpt,
    "prompt_completion": _prompt_completion,
    "text": _text,
}
# The key that gives each format away, checked in this order.
_SIGNATURES = (("messages", "chat"), ("conversations", "sharegpt"), ("instruction", "alpaca"), ("output", "alpaca"),
               ("completion", "prompt_completion"), ("prompt", "prompt_completion"), ("text", "text"))


def detect_format(row: dict) -> str | None:
    for key, fmt in _SIGNATURES:
        if key in row:
            return fmt
    return None


def _is_multimodal(row: dict) -> bool:
    turns = row.get("messages") or row.get("conversations") or []
    parts = [t.get("content", t.get("value")) for t in turns if isinstance(t, dict)] if isinstance(turns, list) else []
    return any(isinstance(p, list) and any(isinstance(x, dict) and "type" in x for x in p) for p in parts)


# Row kinds this version recognises but cannot train, each with what to say. Checked before the
# format, so the message names the kind instead of an unexpected key. The preference-tuning work
# takes its entries out of this list as it adds its formats.
_UNSUPPORTED: tuple[tuple[Callable[[dict], bool], str], ...] = (
    (lambda row: "chosen" in row or "rejected" in row,
     "preference data (chosen/rejected) is not supported by supervised fine-tuning in this version"),
    (lambda row: "label" in row and isinstance(row["label"], bool),
     "KTO preference data (a true/false 'label') is not supported by supervised fine-tuning in this version"),
    (lambda row: bool({"images", "videos", "audios"} & set(row)) or _is_multimodal(row),
     "multimodal rows (images, videos, audios or content parts with a 'type') are not supported in this version; "
     "give text-only rows"),
)


def unsupported_kind(row: dict) -> str | None:
    for matches, message in _UNSUPPORTED:
        if matches(row):
            return message
    return None


# --- files ---------------------------------------------------------------------------------------


def _json_problem(exc: json.JSONDecodeError) -> str:
    # Some of json's messages end in "at" already ("Unterminated string starting at").
    return f"not valid JSON ({exc.msg}{'' if exc.msg.endswith(' at') else ' at'} column {exc.colno})"


def _jsonl_rows(path: Path, text: str, problems: list[str]):
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if len(line) > MAX_LINE_BYTES:
            problems.append(f"{where}: line is {len(line) // 1024 // 1024} MB long (limit 4 MB); is this really one row?")
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: {_json_problem(exc)}")
        except RecursionError:
            problems.append(f"{where}: {_TOO_DEEP}")


def _json_rows(path: Path, text: str, problems: list[str]):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        problems.append(f"{path}:{exc.lineno}: {_json_problem(exc)}")
        return
    except RecursionError:
        problems.append(f"{path}: {_TOO_DEEP}")
        return
    if not isinstance(data, list):
        problems.append(f"{path}: a .json dataset must be an array of rows (use .jsonl for one row per line)")
        return
    for i, row in enumerate(data):
        yield f"{path} row {i + 1}", row


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: a BOM is tolerated
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DatasetError(f"{path}:{line}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None


def _library_rows(path: Path):
    """CSV, Parquet and dataset folders through the `datasets` library (imported only here)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise DatasetError(f"dataset folder {path} has splits {list(ds)} but no 'train' split")
                ds = ds["train"]
        else:
            if path.suffix == ".csv" and not _csv_has_rows(path):
                return
            kind = {".csv": "csv", ".parquet": "parquet"}[path.suffix]
            ds = datasets.Dataset.from_csv(str(path), keep_in_memory=True) if kind == "csv" else \
                datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except DatasetError:
        raise
    except Exception as exc:  # the library's own message says what is wrong with the file
        raise DatasetError(f"{path}: cannot be read as a dataset ({type(exc).__name__}: {exc})") from None
    # CSV rows count from 2: line 1 is the header.
    first = 2 if path.suffix == ".csv" else 1
    for i, row in enumerate(ds):
        where = f"{path}:{i + first}" if path.suffix == ".csv" else f"{path} row {i + 1}"
        yield where, dict(row)  # an empty cell is None: optional fields treat it as absent


def _csv_has_rows(path: Path) -> bool:
    """Checked before the library reads a CSV: it names no row for bad bytes and answers a header-only
    file with 'corresponds to no data'; we say file:line and 'has no rows' as for JSONL."""
    import csv
    import io

    reader = csv.reader(io.StringIO(_read_text(path)))
    return any(any(cell.strip() for cell in row) for i, row in enumerate(reader) if i > 0)


SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def _raw_rows(path: Path, problems: list[str]):
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
            raise DatasetError(
                f"dataset {path} is a folder but not a saved Hugging Face dataset; give a "
                f"{', '.join(SUFFIXES)} file or a folder written by Dataset.save_to_disk"
            )
        return _library_rows(path)
    if path.suffix == ".jsonl":
        return _jsonl_rows(path, _read_text(path), problems)
    if path.suffix == ".json":
        return _json_rows(path, _read_text(path), problems)
    if path.suffix in (".csv", ".parquet"):
        return _library_rows(path)
    raise DatasetError(f"dataset {path}: unknown file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")


def parse_row(row: dict, fmt: str, detect: Callable[[dict], str | None], readers: dict, unknown: str):
    """(format, parsed row) by the named format's reader, or the detected one for `auto`; ValueError
    saying what is wrong with the row otherwise."""
    row_format = fmt if fmt != "auto" else detect(row)
    if row_format is None:
        raise ValueError(f"{unknown} with keys {sorted(row)}; expected one of the formats {', '.join(readers)}, "
                         "or map your columns with dataset.columns")
    return row_format, readers[row_format](row)


def raise_row_problems(path: Path, problems: list[str], first_of_format: dict[str, str]) -> None:
    """One DatasetError naming the first bad rows (file:line) and, for a file that mixes formats, the
    first row of the second format; nothing when every row was good."""
    if len(first_of_format) > 1:
        (main, main_where), (other, other_where) = list(first_of_format.items())[:2]
        problems.append(f"{other_where}: mixes formats ({', '.join(sorted(first_of_format))}): this is the first "
                        f"{other} row, after {main} rows from {main_where}; use one format per file")
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:_MAX_REPORTED])
        more = f"\n  ... and {len(problems) - _MAX_REPORTED} more" if len(problems) > _MAX_REPORTED else ""
        raise DatasetError(f"dataset {path} has {len(problems)} bad row(s):\n{shown}{more}")


def read_dataset(path: str | Path, fmt: str = "auto", columns: dict[str, str] | None = None,
                 replace: dict[str, str] | None = None) -> list[Conversation]:
    """Read a dataset; raise DatasetError naming file:line for each bad row (the first ten shown).

    `path` may also be a LlamaFactory registry entry, `.../dataset_info.json:NAME`. `replace` fills
    `{{name}}` placeholders in every string of every row."""
    from inputs.data.llamafactory_info import is_entry, read_entry

    if is_entry(path):
        path, fmt, columns, adapt = read_entry(path, fmt, columns)
    else:
        adapt = None
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist")
    if fmt != "auto" and fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; valid: auto, {', '.join(FORMATS)}")
    rename = {source: canonical for canonical, source in (columns or {}).items()}
    problems: list[str] = []
    conversations: list[Conversation] = []
    first_of_format: dict[str, str] = {}  # format -> where its first row is
    for where, row in _raw_rows(path, problems):
        if not isinstance(row, dict):
            problems.append(f"{where}: expected an object, got {type(row).__name__}")
            continue
        if replace:
            row = fill_placeholders(row, replace)
        kind = unsupported_kind(row)
        if kind:
            problems.append(f"{where}: {kind}")
            continue
        if rename and not adapt:  # a registry entry's columns may be absent, as in LlamaFactory
            missing = [s for s in rename if s not in row]
            if missing:
                problems.append(f"{where}: column {missing[0]!r} (from dataset.columns) is missing")
                continue
        if rename:
            row = {rename.get(k, k): v for k, v in row.items() if k in rename or not adapt}
        if adapt:
            try:
                row = adapt(row)
            except ValueError as exc:
                problems.append(f"{where}: {exc}")
                continue
        try:
            row_format, parsed = parse_row(row, fmt, detect_format, FORMATS, "unrecognised row")
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        first_of_format.setdefault(row_format, where)
        if isinstance(parsed, str):
            conversations.append(Conversation((), where, row_format, text=parsed))
        elif isinstance(parsed, tuple):  # messages with the tools they may call
            conversations.append(Conversation(tuple(parsed[0]), where, row_format, tools=tuple(parsed[1])))
        else:
            conversations.append(Conversation(tuple(parsed), where, row_format))
    raise_row_problems(path, problems, first_of_format)
    if not conversations:
        raise DatasetError(f"dataset {path} has no rows; add rows in one of the formats {', '.join(FORMATS)}")
    return conversations
