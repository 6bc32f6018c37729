"""Export pieces that need no training: the qwen2 architecture, rope scaling, bf16 weights,
the tokenizer metadata and the Modelfile text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from contract.errors import UserError


def _save_random(model_cls, config, folder: Path, tokenizer, dtype=None):
    import torch

    torch.manual_seed(0)
    model = model_cls(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # larger than init: attention is sharp, mistakes show in the logits
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return model.float().eval()


def _logits_equal(model, gguf_path: Path, tol: float) -> float:
    import torch

    from trainer.export.llamacpp import GgufModel

    ids = [5, 77, 300, 1200, 42, 999, 17, 2000, 64, 128]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = GgufModel(gguf_path).logits(ids)
    diff = float(np.abs(ref - got).max())
    assert diff <= tol, diff
    return diff


def test_qwen2_with_attention_biases_converts_exactly(tmp_path, tokenizers):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from trainer.export.gguf_model import convert
    from trainer.export.weights import ModelWeights

    tok = tokenizers["tiny-llama-bpe"]
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, rope_theta=10000.0)
    model = _save_random(Qwen2ForCausalLM, config, tmp_path / "qwen", tok)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    convert(ModelWeights(tmp_path / "qwen"), tmp_path / "qwen", tmp_path / "q.gguf", "f32", "qwen-test", None)
    _logits_equal(model, tmp_path / "q.gguf", 1e-4)


def test_bf16_weights_and_llama3_rope_scaling(tmp_path, tokenizers):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.export.gguf_model import convert
    from trainer.export.weights import ModelWeights

    tok = tokenizers["tiny-llama-bpe"]
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                         rope_theta=500000.0)
    model = _save_random(LlamaForCausalLM, config, tmp_path / "l3", tok, dtype=torch.bfloat16)
    convert(ModelWeights(tmp_path / "l3"), tmp_path / "l3", tmp_path / "l3.gguf", "f32", "l3-test", None)
    import gguf

    names = {t.name for t in gguf.GGUFReader(tmp_path / "l3.gguf").tensors}
    assert "rope_freqs.weight" in names
    # bf16 on disk, widened exactly; the rope factors make positions past 64 come out right.
    _logits_equal(model, tmp_path / "l3.gguf", 1e-4)


def test_spm_vocab_scores_follow_merge_order_and_types(tokenizers, tmp_path):
    import gguf

    from trainer.export.gguf_vocab import read_vocab

    tok = tokenizers["tiny-llama-spm"]
    tok.save_pretrained(tmp_path)
    vocab = read_vocab(tmp_path, len(tok))
    assert vocab.model == "llama" and vocab.add_bos and not vocab.add_eos
    merges = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["merges"]
    first = "".join(merges[0]) if isinstance(merges[0], list) else merges[0].replace(" ", "")
    assert vocab.scores[vocab.tokens.index(first)] == -1.0
    assert vocab.types[vocab.tokens.index("<0x0A>")] == gguf.TokenType.BYTE
    assert vocab.types[vocab.special_ids["unk"]] == gguf.TokenType.UNKNOWN
    assert vocab.types[vocab.special_ids["bos"]] == gguf.TokenType.CONTROL


def test_unknown_pretokenizer_is_refused_not_guessed():
    from trainer.export.gguf_vocab import _pre_tokenizer_name

    assert _pre_tokenizer_name({"type": "ByteLevel", "use_regex": True}) == "gpt-2"
    with pytest.raises(UserError, match="not one llama.cpp is known to reproduce"):
        _pre_tokenizer_name({"type": "Split", "pattern": {"Regex": r"\w+"}})


def test_unsupported_architecture_lists_the_supported_ones():
    from trainer.export.gguf_model import Shape

    with pytest.raises(UserError, match="supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        Shape.from_config({"architectures": ["GPT2LMHeadModel"]})


def test_modelfile_carries_strategy_settings():
    from contract.chat_templates import TEMPLATES
    from contract.strategy import parse_strategy
    from trainer.export.ollama import modelfile

    strategy = parse_strategy("test", {"fine_tuner": {"config": {
        "base_model": {"name": "x", "huggingface_id": "builtin:tiny-llama-spm"},
        "training_args": {"max_seq_length": 384},
        "export": {"ollama": {"system": "Be brief.", "temperature": 0.2, "top_k": 20}},
    }}})
    text = modelfile(TEMPLATES["chatml"], "<s>", "</s>", strategy)
    lines = text.splitlines()
    assert lines[0] == "FROM ./model.gguf"
    assert 'SYSTEM """Be brief."""' in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines and 'PARAMETER stop "</s>"' in lines
    assert "PARAMETER num_ctx 384" in lines and "PARAMETER temperature 0.2" in lines and "PARAMETER top_k 20" in lines
    # Ollama's own defaults for the rest, from the schema, written out so generate can read them back.
    assert "PARAMETER top_p 0.9" in lines and "PARAMETER repeat_penalty 1.1" in lines
    assert "PARAMETER repeat_last_n 64" in lines and not any(line.startswith("PARAMETER seed") for line in lines)
