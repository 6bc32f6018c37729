"""Reading datasets, chat templates, and prompt masking with golden token ids."""

from __future__ import annotations

import pytest

from contract.chat_templates import TEMPLATES, get_template
from contract.errors import DatasetError, UserError
from inputs.data.records import read_dataset
from trainer.data.tokenize import IGNORE_INDEX, ConversationEncoder, choose_template

from conftest import DATASETS

ALPACA = {"instruction": "Name a fruit.", "input": "", "output": "An apple."}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
}


def test_bundled_datasets_read():
    assert len(read_dataset(DATASETS / "medical_qa.jsonl")) == 200
    assert len(read_dataset(DATASETS / "medical_qa_eval.jsonl")) == 30
    chats = read_dataset(DATASETS / "medical_chat.jsonl")
    assert len(chats) == 40 and any(len(c.messages) > 3 for c in chats)


def test_alpaca_input_joins_the_instruction(write_jsonl):
    path = write_jsonl([{"instruction": "Explain.", "input": "Hb 10.2 g/dL", "output": "Low."}, "", ALPACA])
    rows = read_dataset(path)
    assert rows[0].messages == (
        {"role": "user", "content": "Explain.\n\nHb 10.2 g/dL"},
        {"role": "assistant", "content": "Low."},
    )
    assert [r.where for r in rows] == [f"{path}:1", f"{path}:3"], "blank lines are skipped, line numbers kept"


@pytest.mark.parametrize(
    "rows, message",
    [
        (['{"instruction": "a", "output": "b"', ALPACA], r"data\.jsonl:1: not valid JSON"),
        ([ALPACA, {"instruction": "a"}], r"data\.jsonl:2: alpaca row is missing 'output'"),
        ([{"instruction": "a", "output": 3}], r"data\.jsonl:1: 'output' must be a string, got int"),
        ([{"instruction": " ", "output": "b"}], r"data\.jsonl:1: empty instruction or output"),
        ([{"question": "a"}], r"data\.jsonl:1: unrecognised row with keys \['question'\]"),
        (["[1, 2]"], r"data\.jsonl:1: expected an object, got list"),
        ([{"messages": [{"role": "bot", "content": "x"}]}], r"messages\[0\]\.role 'bot' is not one of"),
        ([{"messages": [{"role": "user", "content": "x"}]}], r"conversation has no assistant turn"),
        ([{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}], "starting with user"),
        ([{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}, {"role": "assistant", "content": "z"}]}], "a system message may only come first"),
        ([ALPACA, CHAT], r"mixes formats \(alpaca, chat\)"),
        ([], r"has no rows"),
    ],
)
def test_bad_rows_are_reported_with_file_and_line(write_jsonl, rows, message):
    with pytest.raises(DatasetError, match=message):
        read_dataset(write_jsonl(rows))


def test_bad_files(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset(tmp_path / "missing.jsonl")
    with pytest.raises(DatasetError, match="is a folder but not a saved Hugging Face dataset"):
        read_dataset(tmp_path)
    ten_mb = tmp_path / "huge.jsonl"
    ten_mb.write_text('{"instruction": "a", "output": "b"}\n' + '{"instruction": "' + "x" * 10_000_000 + '", "output": "b"}\n')
    with pytest.raises(DatasetError, match=r"huge\.jsonl:2: line is 9 MB long \(limit 4 MB\)"):
        read_dataset(ten_mb)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"))
    with pytest.raises(DatasetError, match="not UTF-8 text"):
        read_dataset(latin1)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"instruction": "a", "output": "b"}\n')
    assert len(read_dataset(bom)) == 1


def test_many_problems_are_counted_not_all_printed(write_jsonl):
    with pytest.raises(DatasetError) as info:
        read_dataset(write_jsonl(["{"] * 25))
    assert "has 25 bad row(s)" in str(info.value) and "... and 15 more" in str(info.value)


def test_every_named_template_renders_incrementally(tokenizers):
    tok = tokenizers["tiny-llama-spm"]
    for name in TEMPLATES:
        enc = ConversationEncoder(tok, get_template(name), 512, False, "truncate")
        text, spans = enc.assistant_spans(list(CHAT["messages"]))
        assert [text[a:b] for a, b in spans][0].strip().startswith("Hello."), name


def test_template_choice(tokenizers):
    spm, bpe = tokenizers["tiny-llama-spm"], tokenizers["tiny-llama-bpe"]
    assert choose_template("auto", spm)[0].name == "alpaca"
    assert choose_template("auto", bpe)[0].jinja == TEMPLATES["llama3"].jinja
    assert choose_template("chatml", bpe)[1] == "template: chatml (set in the strategy)"
    with pytest.raises(UserError, match="unknown chat template 'nope'; valid names: auto, alpaca, chatml"):
        choose_template("nope", bpe)


def _answer_ids(tok, ids, labels):
    return [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]


def test_golden_masking_spm_alpaca(tokenizers):
    tok = tokenizers["tiny-llama-spm"]
    enc = ConversationEncoder(tok, get_template("alpaca"), 512, False, "truncate")
    ids, labels = enc.encode([{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."}])
    assert ids == GOLDEN["spm_alpaca_ids"]
    assert _answer_ids(tok, ids, labels) == GOLDEN["spm_alpaca_answer"]
    assert tok.decode(_answer_ids(tok, ids, labels)) == "An apple.</s>"
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_golden_masking_bpe_multi_turn(tokenizers):
    tok = tokenizers["tiny-llama-bpe"]
    template, _ = choose_template("auto", tok)
    enc = ConversationEncoder(tok, template, 512, False, "truncate")
    ids, labels = enc.encode(list(CHAT["messages"]))
    assert ids == GOLDEN["bpe_chat_ids"]
    answer = _answer_ids(tok, ids, labels)
    assert answer == GOLDEN["bpe_chat_answer"]
    assert tok.decode(answer) == "Hello.<|eot_id|>Goodbye.<|eot_id|>", "only assistant turns, each ending in EOS"
    assert ids.count(tok.bos_token_id) == 1, "the template's BOS is not doubled by the tokenizer"


def test_train_on_inputs_and_eos_is_appended_when_the_template_has_none(tokenizers):
    tok = tokenizers["tiny-llama-spm"]
    enc = ConversationEncoder(tok, get_template("chatml"), 512, True, "truncate")
    ids, labels = enc.encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
    assert labels == ids, "train_on_inputs puts every token in the loss"
    assert tok.eos_token_id in ids, "chatml ends turns with <|im_end|> text; EOS is added so generation stops"


def test_truncation_and_dropping_are_counted(tokenizers):
    from inputs.data.records import Conversation

    tok = tokenizers["tiny-llama-spm"]
    long = Conversation(({"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "fine " * 40}), "f:1", "chat")
    short = Conversation(({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}), "f:2", "chat")
    rows, stats = ConversationEncoder(tok, get_template("alpaca"), 64, False, "truncate").encode_all([long, short])
    assert (len(rows), stats.truncated, len(rows[0][0])) == (2, 1, 64)
    rows, stats = ConversationEncoder(tok, get_template("alpaca"), 64, False, "drop").encode_all([long, short])
    assert (len(rows), stats.dropped_too_long) == (1, 1)
    prompt_only = Conversation(({"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "x"}), "f:3", "chat")
    with pytest.raises(UserError, match="no usable rows: 0 longer than max_seq_length=64 \\(dropped\\), 1 with no answer"):
        ConversationEncoder(tok, get_template("alpaca"), 64, False, "truncate").encode_all([prompt_only])


# Token ids of the builtin tokenizers (recipe version 2). They change only when the builtin recipe
# or corpus changes; then regenerate them and check the decoded strings above still hold.
GOLDEN = {
    "spm_alpaca_ids": [1, 931, 261, 261, 620, 1802, 577, 284, 13, 303, 1095, 364, 995, 272, 13, 13, 261, 261, 261, 728,
                       373, 335, 1278, 284, 13, 290, 333, 838, 646, 2],
    "spm_alpaca_answer": [290, 333, 838, 646, 2],
    "bpe_chat_ids": [2043, 2045, 1595, 286, 353, 2046, 198, 198, 33, 68, 267, 392, 68, 69, 13, 2047, 2045, 374, 262,
                     2046, 198, 198, 39, 72, 2047, 2045, 525, 674, 880, 2046, 198, 198, 39, 341, 302, 13, 2047, 2045,
                     374, 262, 2046, 198, 198, 33, 88, 68, 2047, 2045, 525, 674, 880, 2046, 198, 198, 1556, 65, 88,
                     68, 13, 2047],
    "bpe_chat_answer": [39, 341, 302, 13, 2047, 1556, 65, 88, 68, 13, 2047],
}
