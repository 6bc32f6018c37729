"""Tool-calling rows: tool definitions, assistant tool calls and tool results.

Two shapes are read, both into the messages a Hugging Face chat template expects:
    OpenAI messages   {"messages": [..., {"role": "assistant", "content": null, "tool_calls": [{"type": "function",
                      "function": {"name", "arguments"}}]}, {"role": "tool", "content"}], "tools": [...]}
    LlamaFactory's ShareGPT  {"conversations": [..., {"from": "function_call", "value": "{\"name\": ..., \"arguments\":
                      {...}}"}, {"from": "observation", "value": "..."}], "tools": "[{\"name\", ...}]"}
Out: an assistant message may carry "tool_calls" [{"type": "function", "function": {"name", "arguments": dict}}];
role "tool" holds a result; tools are [{"type": "function", "function": {"name", "description", "parameters"}}].
Tool results are never in the loss: only assistant turns are (trainer/data/tokenize.py).
"""

from __future__ import annotations

import json

_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "function_call": "tool_call", "observation": "tool", "tool": "tool"}


def uses_tools(row: dict, key: str) -> bool:
    turns = row.get(key)
    if "tools" in row:
        return True
    if not isinstance(turns, list):
        return False
    return any(isinstance(t, dict) and ("tool_calls" in t or t.get("role") == "tool"
                                        or t.get("from") in ("function_call", "observation")) for t in turns)


def _json(value, what: str):
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} is not valid JSON ({exc.msg} at column {exc.colno})") from None


def _tools(row: dict) -> list[dict]:
    raw = row.get("tools")
    if raw is None or raw == "":
        return []
    tools = _json(raw, "'tools'")
    if not isinstance(tools, list):
        raise ValueError("'tools' must be a list of tool definitions")
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"tools[{i}] must be an object with a 'name' (or a 'function' with one)")
        out.append({"type": "function", "function": function})
    return out


def _call(raw, where: str) -> dict:
    call = _json(raw, where)
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError(f"{where} must be an object with a 'name' and 'arguments'")
    arguments = _json(function.get("arguments", {}), f"{where} arguments")
    if not isinstance(arguments, dict):
        raise ValueError(f"{where} arguments must be a JSON object")
    return {"type": "function", "function": {"name": function["name"], "arguments": arguments}}


def check_tool_turns(messages: list[dict]) -> list[dict]:
    """Order: user first; a tool result only after a call (or another result); calls answered by results."""
    for i, m in enumerate(messages):
        if m["role"] == "system" and i != 0:
            raise ValueError(f"turn {i}: a system message may only come first")
    turns = [m for m in messages if m["role"] != "system"]
    if not any(m["role"] == "assistant" for m in turns):
        raise ValueError("conversation has no assistant turn, so nothing to learn from")
    if turns[0]["role"] != "user":
        raise ValueError("turns must start with user")
    for before, m in zip(turns, turns[1:]):
        calling = before["role"] == "assistant" and before.get("tool_calls")
        if m["role"] == "tool" and not (calling or before["role"] == "tool"):
            raise ValueError("a tool result must follow an assistant tool call")
        if calling and m["role"] != "tool":
            raise ValueError("an assistant tool call must be followed by its tool result")
        if m["role"] == before["role"] and m["role"] != "tool":
            raise ValueError(f"two {m['role']} turns in a row; turns alternate user, assistant (tool calls and results between)")
        if m["role"] == "user" and before["role"] == "tool":
            raise ValueError("a tool result must be followed by an assistant turn")
    for m in turns:
        if m["role"] == "assistant" and not m.get("tool_calls") and not m["content"].strip():
            raise ValueError("an assistant message is empty")
    return messages


def _turn_list(row: dict, key: str) -> list:
    """The row's non-empty list of turns under `key`; besides it, only a 'tools' column is allowed."""
    extra = set(row) - {key, "tools"}
    if extra:
        raise ValueError(f"unexpected keys {sorted(extra)} beside '{key}' and 'tools'")
    items = row.get(key)
    if not isinstance(items, list) or not items:
        raise ValueError(f"'{key}' must be a non-empty list")
    return items


def chat_row(row: dict) -> tuple[list[dict], list[dict]]:
    items = _turn_list(row, "messages")
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"messages[{i}].role must be one of system, user, assistant, tool")
        content = m.get("content")
        if content is None and m.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        message = {"role": m["role"], "content": content}
        if m.get("tool_calls"):
            if m["role"] != "assistant" or not isinstance(m["tool_calls"], list):
                raise ValueError(f"messages[{i}].tool_calls must be a list on an assistant message")
            message["tool_calls"] = [_call(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(m["tool_calls"])]
        out.append(message)
    return check_tool_turns(out), _tools(row)


def sharegpt_row(row: dict) -> tuple[list[dict], list[dict]]:
    items = _turn_list(row, "conversations")
    out: list[dict] = []
    for i, m in enumerate(items):
        if not isinstance(m, dict) or set(m) != {"from", "value"} or not isinstance(m["value"], str):
            raise ValueError(f"conversations[{i}] must be an object with exactly 'from' and a string 'value'")
        role = _SHAREGPT_ROLES.get(m["from"])
        if role is None:
            raise ValueError(f"conversations[{i}].from {m['from']!r} is not one of {', '.join(_SHAREGPT_ROLES)}")
        if role == "tool_call":
            # LlamaFactory writes one call, or a list for parallel calls, as JSON text.
            raw = _json(m["value"], f"conversations[{i}] (function_call)")
            calls = raw if isinstance(raw, list) else [raw]
            out.append({"role": "assistant", "content": "",
                        "tool_calls": [_call(c, f"conversations[{i}] (function_call)") for c in calls]})
        else:
            out.append({"role": role, "content": m["value"]})
    return check_tool_turns(out), _tools(row)
