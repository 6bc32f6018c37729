"""What LlamaFactory users bring: tool calling (two forms, two template families, golden ids, the
Ollama form rendered by Go), system columns, dataset_info.json entries, long text as pretraining
blocks, placeholders, refusals naming what is unsupported. Rows are small ones made here in the
shapes of LlamaFactory's demo files, never copies of them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from contract.chat_templates import get_template
from contract.errors import DatasetError, StrategyError
from contract.strategy import parse_strategy
from inputs.data.records import read_dataset
from trainer.data.tokenize import IGNORE_INDEX, ConversationEncoder

GO_RENDERER = Path(__file__).resolve().parent / "ollama_template"
TOOLS = [{"name": "get_weather", "description": "Weather now in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
# The same conversation in LlamaFactory's ShareGPT form (glaive_toolcall shape) and in OpenAI's.
SHAREGPT_TOOLS = {
    "conversations": [
        {"from": "human", "value": "Weather in Oslo?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
        {"from": "observation", "value": json.dumps({"temp": 3})},
        {"from": "gpt", "value": "It is 3 degrees."},
    ],
    "system": "Be brief.",
    "tools": json.dumps(TOOLS),
}
OPENAI_TOOLS = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "content": json.dumps({"temp": 3})},
        {"role": "assistant", "content": "It is 3 degrees."},
    ],
    "tools": [{"type": "function", "function": TOOLS[0]}],
}


def test_tool_rows_in_both_forms_read_the_same(write_jsonl):
    a, = read_dataset(write_jsonl([SHAREGPT_TOOLS], "a.jsonl"))
    b, = read_dataset(write_jsonl([OPENAI_TOOLS], "b.jsonl"))
    assert (a.messages, a.tools) == (b.messages, b.tools)
    assert a.messages[2] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}
    assert a.tools == ({"type": "function", "function": TOOLS[0]},)


@pytest.mark.parametrize("row, message", [
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "observation", "value": "y"},
                        {"from": "gpt", "value": "z"}]}, "a tool result must follow an assistant tool call"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "{bad"}]},
     r"conversations\[1\] \(function_call\) is not valid JSON"),
    ({**SHAREGPT_TOOLS, "tools": "[{}]"}, r"tools\[0\] must be an object with a 'name'"),
    ({"chosen": "a", "rejected": "b", "instruction": "q"}, "preference data \\(chosen/rejected\\) is not supported"),
    ({"messages": [{"role": "user", "content": "x"}], "label": True}, "KTO preference data"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]},
     "multimodal rows .* are not supported"),
    ({"instruction": "a", "output": "b", "images": ["x.png"]}, "multimodal rows"),
])
def test_bad_tool_rows_and_unsupported_kinds_are_named(write_jsonl, row, message):
    with pytest.raises(DatasetError, match=message):
        read_dataset(write_jsonl([row]))


def test_system_column_everywhere(write_jsonl):
    rows = [{"instruction": "Name a fruit.", "output": "An apple.", "system": "Be brief."}]
    alpaca, = read_dataset(write_jsonl(rows, "a.jsonl"))
    pc, = read_dataset(write_jsonl([{"prompt": "Name a fruit.", "completion": "An apple.", "system": "Be brief."}], "p.jsonl"))
    sg, = read_dataset(write_jsonl([{"conversations": [{"from": "human", "value": "Name a fruit."},
                                                       {"from": "gpt", "value": "An apple."}], "system": "Be brief."}], "s.jsonl"))
    expected = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."},
                {"role": "assistant", "content": "An apple."})
    assert alpaca.messages == pc.messages == sg.messages == expected
    both = {"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"},
                         {"role": "assistant", "content": "c"}], "system": "d"}
    with pytest.raises(DatasetError, match="both a 'system' column and a system message"):
        read_dataset(write_jsonl([both], "both.jsonl"))


def _encode(tokenizers, kind, template, conv):
    tok = tokenizers[f"tiny-llama-{kind}"]
    enc = ConversationEncoder(tok, get_template(template), 512, False, "truncate")
    return tok, enc, enc.encode(list(conv.messages), conv.tools)


@pytest.mark.parametrize("kind, template", [("spm", "chatml"), ("bpe", "llama3")])
def test_golden_tool_calling_ids_and_masking(tokenizers, write_jsonl, kind, template):
    conv, = read_dataset(write_jsonl([SHAREGPT_TOOLS]))
    tok, enc, (ids, labels) = _encode(tokenizers, kind, template, conv)
    answer = tok.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert answer == GOLDEN[f"{template}_answer"], "the call and the final answer train; the tool result never"
    assert "temp" not in answer and "Weather in Oslo" not in answer
    assert ids == GOLDEN[f"{template}_ids"]


def _tool_cases(conv) -> list[tuple[list[dict], list[dict]]]:
    two_calls = {"role": "assistant", "content": "Checking both.", "tool_calls": [conv.messages[2]["tool_calls"][0]] * 2}
    return [
        (list(conv.messages[:-1]), list(conv.tools)),  # system, user, call, result: the model answers next
        (list(conv.messages[1:2]), list(conv.tools)),  # no system prompt
        ([*conv.messages[1:2], two_calls, conv.messages[3], conv.messages[3]], list(conv.tools)),  # parallel calls
        (list(conv.messages[:2]), []),  # no tools at all: the plain form
        (list(conv.messages[1:2]), []),  # neither tools nor a system prompt
    ]


def _jinja_env(tojson):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    return env


@pytest.mark.parametrize("template", ["chatml", "qwen2.5", "llama3"])
def test_tool_templates_have_an_exact_ollama_form(write_jsonl, template):
    """Go's text/template (as Ollama renders .Messages, .Tools, .ToolCalls) gives the Jinja text."""
    if not shutil.which("go"):
        pytest.fail("Go is needed to render Ollama templates exactly as Ollama does; scripts/test.sh installs golang-go")
    conv, = read_dataset(write_jsonl([SHAREGPT_TOOLS]))
    env = _jinja_env(lambda x, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, separators=separators, sort_keys=sort_keys))
    chat = get_template(template)
    for messages, tools in _tool_cases(conv):
        jinja = env.from_string(chat.jinja).render(messages=messages, tools=tools or None, bos_token="<s>",
                                                   eos_token="</s>", add_generation_prompt=True)
        stdin = json.dumps({"template": chat.ollama_template("<s>", "</s>"), "messages": messages, "tools": tools})
        proc = subprocess.run(["go", "run", "."], cwd=GO_RENDERER, input=stdin, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "GOFLAGS": "-mod=mod"})
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == jinja.removeprefix("<s>"), (template, proc.stdout, jinja)


# Qwen's own chat templates, as trl ships them (read from the installed package, not copied here).
QWEN_OWN = {"chatml": "qwen3.jinja", "qwen2.5": "qwen2_5.jinja"}


@pytest.mark.parametrize("template", sorted(QWEN_OWN))
def test_qwen_templates_render_as_qwens_own_but_for_json_spacing(write_jsonl, template):
    """Tools block, calls, grouped results and default system text as Qwen's own template writes them. JSON
    is compact with sorted keys in both our forms (Ollama's `json` writes only that; Qwen's tojson writes
    Python's spaced JSON in the given key order), so Qwen's is rendered with that JSON here."""
    import trl

    own = (Path(trl.__file__).parent / "chat_templates" / QWEN_OWN[template]).read_text()
    env = _jinja_env(lambda x, **_: json.dumps(x, ensure_ascii=False, separators=(",", ":"), sort_keys=True))
    conv, = read_dataset(write_jsonl([SHAREGPT_TOOLS]))
    for messages, tools in _tool_cases(conv):
        ours, theirs = (env.from_string(jinja).render(messages=messages, tools=tools or None, add_generation_prompt=True)
                        for jinja in (get_template(template).jinja, own))
        assert ours == theirs, (messages, tools)


def test_a_template_without_tools_refuses_tool_rows(tokenizers, write_jsonl):
    from contract.errors import UserError

    conv, = read_dataset(write_jsonl([SHAREGPT_TOOLS]))
    with pytest.raises(UserError, match="chat template 'alpaca' has no tool-calling form"):
        _encode(tokenizers, "spm", "alpaca", conv)


def test_placeholders_are_filled_and_the_unfilled_counted(write_jsonl):
    from inputs.data.placeholders import unfilled_warning

    rows = [{"instruction": "Who are you?", "output": "I am {{name}}, made by {{author}}."},
            {"instruction": "Hi", "output": "Hello, I am {{name}}."}]
    path = write_jsonl(rows)
    filled = read_dataset(path, replace={"name": "MedBot", "author": "Acme"})
    assert filled[0].messages[1]["content"] == "I am MedBot, made by Acme."
    assert unfilled_warning(filled) is None
    half = read_dataset(path, replace={"author": "Acme"})
    assert unfilled_warning(half) == ("warning: 2 unfilled placeholder(s) would be trained as written: {{name}} in 2 "
                                      "row(s); fill them with dataset.replace: {name: ...}")


def _registry(tmp_path, entries: dict, files: dict) -> Path:
    for name, rows in files.items():
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "dataset_info.json").write_text(json.dumps(entries))
    return tmp_path / "dataset_info.json"


def test_dataset_info_entries(tmp_path):
    registry = _registry(tmp_path, {
        "identity": {"file_name": "identity.jsonl"},
        "qa": {"file_name": "qa.jsonl", "columns": {"prompt": "q", "query": "ctx", "response": "a", "system": "sys"}},
        "glaive": {"file_name": "glaive.jsonl", "formatting": "sharegpt", "columns": {"messages": "conversations",
                                                                                      "tools": "tools"}},
        "openai": {"file_name": "openai.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
                   "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                            "system_tag": "system"}},
        "c4": {"file_name": "c4.jsonl", "columns": {"prompt": "text"}},
        "hub": {"hf_hub_url": "someone/data"},
        "pairs": {"file_name": "qa.jsonl", "ranking": True},
    }, {
        "identity.jsonl": [{"instruction": "hi", "input": "", "output": "I am {{name}}."}],
        "qa.jsonl": [{"q": "Explain.", "ctx": "Hb 10", "a": "Low.", "sys": "Be brief.", "extra": 1}],
        "glaive.jsonl": [SHAREGPT_TOOLS],
        "openai.jsonl": [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}],
        "c4.jsonl": [{"text": "A long document."}],
    })
    identity, = read_dataset(f"{registry}:identity", replace={"name": "MedBot"})
    assert identity.messages[1]["content"] == "I am MedBot."
    qa, = read_dataset(f"{registry}:qa")
    assert qa.messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Explain.\n\nHb 10"},
                           {"role": "assistant", "content": "Low."}), "columns other than the entry's are ignored"
    glaive, = read_dataset(f"{registry}:glaive")
    assert glaive.tools and glaive.messages[1]["tool_calls"], "system is not among the entry's columns"
    assert read_dataset(f"{registry}:openai")[0].messages[1] == {"role": "assistant", "content": "Hello."}
    c4, = read_dataset(f"{registry}:c4")
    assert (c4.format, c4.text) == ("text", "A long document.")
    for name, message in (("nope", "has no entry 'nope'; its entries: c4, glaive, hub"),
                          ("hub", "only local files are read"), ("pairs", "preference data")):
        with pytest.raises(DatasetError, match=message):
            read_dataset(f"{registry}:{name}")


def test_llamafactory_column_names_are_strategy_errors():
    data = {"fine_tuner": {"config": {"base_model": {"name": "t", "huggingface_id": "builtin:tiny-llama-spm"},
                                      "dataset": {"columns": {"prompt": "instruction", "query": "input",
                                                              "response": "output"}}}}}
    with pytest.raises(StrategyError, match="unknown field\\(s\\) query, response; valid: instruction.*query is "
                                            "LlamaFactory's name for input"):
        parse_strategy("s.yaml", data)


def test_long_text_trains_every_token_as_blocks(tokenizers):
    from inputs.data.records import Conversation

    tok = tokenizers["tiny-llama-spm"]
    docs = [Conversation((), f"f:{i}", "text", text="word " * (30 + 20 * i)) for i in range(4)]
    blocks, stats = ConversationEncoder(tok, get_template("alpaca"), 32, False, "truncate", "blocks").encode_all(docs)
    stream = [t for d in docs for t in ConversationEncoder(tok, get_template("alpaca"), 32, False, "truncate").encode_text(d.text)[0]]
    assert [t for ids, _ in blocks for t in ids] == stream, "documents joined, in order, each ending in EOS"
    assert all(len(ids) == 32 for ids, _ in blocks[:-1]) and 1 < len(blocks[-1][0]) <= 32
    assert (stats.tokens, stats.source_tokens, stats.share_trained) == (len(stream), len(stream), 1.0)
    assert all(labels == ids for ids, labels in blocks)
    _, cut = ConversationEncoder(tok, get_template("alpaca"), 32, False, "truncate", "truncate").encode_all(docs)
    assert (cut.tokens, cut.share_trained) == (4 * 32, 4 * 32 / len(stream)), "truncation throws the rest away"


def test_validate_reports_consistent_counts(run_cli, tmp_path):
    path = tmp_path / "c4.jsonl"
    path.write_text("".join(json.dumps({"text": "word " * 200}) + "\n" for _ in range(3)))
    result = run_cli("finetune", "dataset", "validate", path, "--strategy", "tiny_demo", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["share_trained"] == 1.0 and report["tokens_per_epoch"] == report["tokens_total"]
    assert report["target_tokens"] < report["tokens_per_epoch"], "in the loss: after the cut, never more than trained"


# Token ids of the builtin tokenizers (recipe version 3) for SHAREGPT_TOOLS. They change only when the
# builtin recipe, its corpus or these templates change; then regenerate them and check the decoded answers hold.
GOLDEN: dict = {
    "llama3_answer": "{\"name\": \"get_weather\", \"parameters\": {\"city\":\"Oslo\"}}<|eot_id|>It is 3 degrees.<|eot_id|>",
    "llama3_ids": [
        2043, 2045, 1595, 286, 353, 2046, 198, 198, 33, 68, 267, 392, 68, 69, 13, 2047, 2045, 374, 262, 2046, 198,
        198, 38, 72, 505, 269, 268, 324, 455, 277, 521, 82, 11, 280, 278, 481, 1273, 67, 331, 256, 220, 41, 50, 46,
        45, 322, 256, 521, 682, 331, 951, 1745, 1291, 387, 267, 440, 1731, 372, 269, 303, 72, 505, 379, 611, 13, 198,
        198, 49, 265, 924, 67, 296, 269, 322, 1347, 1469, 1591, 704, 521, 963, 11, 350, 79, 285, 348, 1702, 704,
        1885, 534, 293, 990, 377, 963, 279, 951, 664, 92, 13, 757, 78, 477, 490, 1824, 13, 198, 198, 90, 1, 1580,
        704, 90, 1, 67, 265, 584, 2017, 704, 1, 54, 68, 1397, 1678, 296, 256, 264, 533, 496, 1, 1591, 704, 1, 565,
        62, 570, 1397, 496, 1, 79, 285, 348, 1702, 704, 90, 1, 1146, 567, 301, 265, 704, 90, 1, 66, 533, 704, 90, 1,
        83, 475, 68, 704, 1, 286, 926, 1898, 92, 1908, 1171, 920, 704, 1957, 66, 533, 1309, 1908, 83, 475, 68, 704,
        1, 78, 65, 798, 1898, 92, 1908, 83, 475, 68, 704, 1, 1580, 1898, 198, 198, 54, 68, 1397, 296, 613, 82, 302,
        30, 2047, 2045, 525, 674, 880, 2046, 198, 198, 90, 1, 1591, 704, 350, 565, 62, 570, 1397, 496, 350, 79, 285,
        348, 1702, 704, 1469, 66, 533, 704, 1, 46, 82, 302, 1898, 92, 2047, 2045, 1133, 547, 263, 2046, 198, 198, 90,
        1, 83, 353, 79, 704, 220, 18, 92, 2047, 2045, 525, 674, 880, 2046, 198, 198, 40, 83, 288, 220, 18, 501, 70,
        261, 265, 13, 2047,
    ],
    "chatml_answer": "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\":\"Oslo\"}}\n</tool_call><|im_end|>\nIt is 3 degrees.<|im_end|>\n</s>",
    "chatml_ids": [
        1, 1258, 347, 476, 318, 394, 538, 347, 288, 1049, 394, 465, 13, 291, 324, 376, 502, 324, 1041, 13, 13, 261,
        410, 1452, 338, 13, 13, 313, 393, 764, 801, 739, 427, 593, 613, 338, 403, 535, 338, 794, 442, 377, 1169, 370,
        667, 370, 883, 13, 13, 313, 393, 485, 489, 341, 450, 401, 442, 613, 730, 383, 1462, 1331, 1258, 754, 434,
        338, 288, 286, 273, 754, 434, 338, 288, 363, 91, 302, 301, 365, 697, 1717, 13, 286, 754, 434, 338, 288, 13,
        346, 260, 325, 469, 577, 826, 346, 260, 323, 373, 698, 335, 471, 826, 260, 312, 324, 1508, 1806, 404, 364,
        371, 769, 615, 260, 1709, 826, 260, 684, 318, 686, 1508, 615, 260, 335, 392, 460, 415, 516, 826, 346, 260,
        1251, 700, 408, 373, 826, 346, 260, 322, 769, 826, 346, 260, 339, 589, 324, 826, 260, 394, 1048, 260, 348,
        348, 270, 260, 1274, 1045, 826, 315, 260, 322, 769, 1418, 270, 260, 339, 589, 324, 826, 260, 334, 321, 926,
        260, 348, 348, 270, 260, 339, 589, 324, 826, 260, 325, 469, 577, 260, 348, 13, 286, 273, 754, 434, 338, 288,
        13, 13, 295, 374, 1003, 613, 801, 270, 507, 364, 705, 338, 372, 1384, 442, 613, 1624, 387, 2007, 1331, 1258,
        754, 434, 318, 322, 518, 288, 286, 273, 754, 434, 318, 322, 518, 288, 363, 91, 302, 301, 365, 697, 1717, 13,
        286, 754, 434, 318, 322, 518, 288, 13, 346, 260, 1709, 826, 1258, 325, 469, 577, 271, 1709, 288, 270, 462,
        392, 980, 1154, 826, 1258, 392, 326, 338, 271, 1447, 372, 271, 334, 321, 926, 288, 348, 13, 286, 273, 754,
        434, 318, 322, 518, 288, 286, 347, 476, 318, 724, 347, 288, 13, 286, 347, 476, 318, 394, 538, 347, 288, 494,
        370, 13, 312, 324, 1508, 404, 639, 338, 411, 289, 286, 347, 476, 318, 724, 347, 288, 13, 286, 347, 476, 318,
        394, 538, 347, 288, 658, 794, 945, 13, 286, 754, 434, 318, 322, 518, 288, 13, 346, 260, 1709, 826, 462, 684,
        318, 686, 1508, 615, 462, 392, 980, 1154, 826, 1593, 322, 769, 826, 260, 304, 338, 411, 260, 348, 348, 13,
        286, 273, 754, 434, 318, 322, 518, 288, 286, 347, 476, 318, 724, 347, 288, 13, 286, 347, 476, 318, 394, 538,
        347, 288, 494, 370, 13, 286, 754, 434, 318, 500, 335, 1278, 288, 13, 346, 260, 339, 465, 335, 826, 565, 348,
        13, 286, 273, 754, 434, 318, 500, 335, 1278, 288, 286, 347, 476, 318, 724, 347, 288, 13, 286, 347, 476, 318,
        394, 538, 347, 288, 658, 794, 945, 13, 298, 339, 395, 565, 544, 326, 369, 552, 286, 347, 476, 318, 724, 347,
        288, 13, 2,
    ],
}


def _registry_of_llamafactory_shapes(tmp_path) -> Path:
    """A dataset_info.json as LlamaFactory users have it, with a few rows in each demo file's shape."""
    alpaca = [{"instruction": f"Name a colour, number {i}.", "input": "", "output": f"Colour {i} is blue."} for i in range(8)]
    chinese = [{"instruction": f"说出一种颜色，第{i}个。", "input": "", "output": f"第{i}种颜色是蓝色。"} for i in range(8)]
    identity = [{"instruction": f"Who are you? ({i})", "input": "", "output": "I am {{name}}, made by {{author}}."}
                for i in range(8)]
    c4 = [{"text": " ".join(f"word{j % 97}" for j in range(400 + 50 * i))} for i in range(4)]
    return _registry(tmp_path, {
        "alpaca_en_demo": {"file_name": "alpaca_en_demo.jsonl"},
        "alpaca_zh_demo": {"file_name": "alpaca_zh_demo.jsonl"},
        "identity": {"file_name": "identity.jsonl"},
        "glaive_toolcall_en_demo": {"file_name": "glaive.jsonl", "formatting": "sharegpt",
                                    "columns": {"messages": "conversations", "tools": "tools"}},
        "c4_demo": {"file_name": "c4_demo.jsonl", "columns": {"prompt": "text"}},
    }, {"alpaca_en_demo.jsonl": alpaca, "alpaca_zh_demo.jsonl": chinese, "identity.jsonl": identity,
        "glaive.jsonl": [SHAREGPT_TOOLS] * 8, "c4_demo.jsonl": c4})


@pytest.mark.parametrize("name, settings", [
    ("alpaca_en_demo", []), ("alpaca_zh_demo", []),
    ("identity", ["dataset.replace.name=FarmBot", "dataset.replace.author=LlamaFarm"]),
    ("glaive_toolcall_en_demo", []), ("c4_demo", []),
])
def test_llamafactory_demo_shapes_train_with_tiny_demo(run_cli, tmp_path, name, settings):
    from contract.job_folder import read_job, read_metrics

    registry = _registry_of_llamafactory_shapes(tmp_path)
    overrides = [arg for s in ["training_args.max_steps=2", *settings] for arg in ("--set", s)]
    result = run_cli("run", "--strategy", "tiny_demo", "--dataset", f"{registry}:{name}", *overrides,
                     "--foreground", "--json")
    assert result.exit_code == 0, result.output
    job_dir = Path(json.loads(result.stdout[result.stdout.index("{"):result.stdout.index("}") + 1])["job_dir"])
    assert read_job(job_dir)["status"] == "completed"
    assert [m["step"] for m in read_metrics(job_dir) if "loss" in m][-1] == 2
    log = (job_dir / "train.log").read_text()
    assert "unfilled placeholder" not in log, "identity's {{name}} and {{author}} are filled from --set"
    if name == "c4_demo":
        assert "tokens trained (100%)" in log, "long documents train as full blocks, nothing cut away"
