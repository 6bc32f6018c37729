"""Preference data: the three formats, detection, file:line errors, and pairs never sharing a row."""

from __future__ import annotations

import json

import pytest

from contract.errors import DatasetError, UserError
from inputs.data.preference import Pair, Unpaired, as_stage_items, read_preference_dataset


def _write(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_three_formats_are_detected_and_read_alike(tmp_path):
    strings = _write(tmp_path, [{"prompt": "2+2?", "chosen": "Sure! 4.", "rejected": "4."}], "s.jsonl")
    lists = _write(tmp_path, [{"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "2+2?"}],
                               "chosen": [{"role": "assistant", "content": "Sure! 4."}],
                               "rejected": [{"role": "assistant", "content": "4."}]}], "l.jsonl")
    sharegpt = _write(tmp_path, [{"conversations": [{"from": "human", "value": "2+2?"}], "system": "Be kind.",
                                  "chosen": {"from": "gpt", "value": "Sure! 4."},
                                  "rejected": {"from": "gpt", "value": "4."}}], "g.jsonl")
    kto = _write(tmp_path, [{"prompt": "2+2?", "completion": "Sure! 4.", "label": True}], "k.jsonl")
    user = {"role": "user", "content": "2+2?"}
    system = {"role": "system", "content": "Be kind."}
    assert read_preference_dataset(strings)[0] == Pair((user,), "Sure! 4.", "4.", f"{strings}:1")
    assert read_preference_dataset(lists)[0] == Pair((system, user), "Sure! 4.", "4.", f"{lists}:1")
    assert read_preference_dataset(sharegpt)[0] == Pair((system, user), "Sure! 4.", "4.", f"{sharegpt}:1")
    assert read_preference_dataset(kto)[0] == Unpaired((user,), "Sure! 4.", True, f"{kto}:1")


def test_bad_rows_are_reported_with_file_and_line(tmp_path):
    path = _write(tmp_path, [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "a"},
        {"prompt": "q", "completion": "a", "label": "yes"},
        {"conversations": [{"from": "gpt", "value": "hi"}], "chosen": {"from": "gpt", "value": "a"},
         "rejected": {"from": "gpt", "value": "b"}},
        {"prompt": "q", "chosen": "", "rejected": "b"},
    ])
    with pytest.raises(DatasetError) as err:
        read_preference_dataset(path)
    text = str(err.value)
    assert f"{path}:2: preference row is missing 'rejected'" in text
    assert f"{path}:3: 'label' must be true or false, got 'yes'" in text
    assert f"{path}:4: 'conversations' must end with a user turn" in text
    assert f"{path}:5: 'chosen' is empty" in text
    assert f"{path}:1" not in text


def test_sft_rows_are_not_preference_data(tmp_path):
    path = _write(tmp_path, [{"instruction": "q", "output": "a"}])
    with pytest.raises(DatasetError, match=r"d.jsonl:1: not preference data with keys \['instruction', 'output'\]"):
        read_preference_dataset(path)


def test_pairs_train_kto_and_single_answers_do_not_train_dpo(tmp_path):
    pairs = read_preference_dataset(_write(tmp_path, [{"prompt": "q", "chosen": "good", "rejected": "bad"}]))
    unpaired = as_stage_items(pairs, "kto", "d")
    assert [(u.completion, u.desirable) for u in unpaired] == [("good", True), ("bad", False)]
    single = read_preference_dataset(_write(tmp_path, [{"prompt": "q", "completion": "a", "label": False}], "k.jsonl"))
    with pytest.raises(UserError, match="method.stage dpo needs chosen/rejected pairs"):
        as_stage_items(single, "dpo", "k.jsonl")
