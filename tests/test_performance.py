"""Speed levers must not change what is computed: the chunked loss against the plain one, the lever
decisions, and the benchmark's own measuring pieces (same tokens on both sides, FLOPs, warm-up)."""

from __future__ import annotations

import pytest

from conftest import DATASETS


@pytest.mark.parametrize("weight_grad", [False, True])
def test_chunked_cross_entropy_equals_plain(monkeypatch, weight_grad):
    import torch

    from trainer import performance

    monkeypatch.setattr(performance, "_CHUNK_ELEMENTS", 3000 * 70)  # 70-row chunks: 5 chunks, the last partial
    torch.manual_seed(0)
    hidden = torch.randn(300, 48, requires_grad=True)
    weight = (0.3 * torch.randn(3000, 48)).requires_grad_(weight_grad)
    targets = torch.randint(0, 3000, (300,))

    plain = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets)
    plain_grads = torch.autograd.grad(plain, [hidden, weight] if weight_grad else [hidden])
    chunked = performance.linear_cross_entropy(hidden, weight, targets)
    chunked_grads = torch.autograd.grad(3 * chunked, [hidden, weight] if weight_grad else [hidden])

    assert chunked.item() == pytest.approx(plain.item(), abs=1e-5)
    for ours, theirs in zip(chunked_grads, plain_grads):
        assert torch.allclose(ours / 3, theirs, atol=1e-6)


def _lora_tiny(dtype=None):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.models.builtin import builtin_path

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(builtin_path("builtin:tiny-llama-bpe"), dtype=dtype or torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def test_chunked_loss_equals_the_models_own_loss_on_a_packed_batch(tokenizers):
    import torch

    from trainer.data.batching import collate
    from trainer.data.records import read_dataset
    from trainer.data.tokenize import ConversationEncoder, choose_template
    from trainer.loop import _forward

    tok = tokenizers["tiny-llama-bpe"]
    template, _ = choose_template("auto", tok)
    rows, _ = ConversationEncoder(tok, template, 256, False, "truncate").encode_all(
        read_dataset(DATASETS / "medical_qa.jsonl")[:5])
    batch = collate([[rows[0], rows[1], rows[2]], [rows[3], rows[4]]], tok.pad_token_id, packed=True)
    model = _lora_tiny()
    trainable = [p for p in model.parameters() if p.requires_grad]

    own = _forward(model, batch, "cpu", "fp32", chunked_loss=False).loss
    own_grads = torch.autograd.grad(own, trainable)
    chunked = _forward(model, batch, "cpu", "fp32", chunked_loss=True).loss
    chunked_grads = torch.autograd.grad(chunked, trainable)

    assert chunked.item() == pytest.approx(own.item(), abs=1e-5)
    for ours, theirs in zip(chunked_grads, own_grads):
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)


def test_chunked_loss_under_bf16_autocast_stays_close_to_the_models_own(tokenizers):
    import torch

    from trainer.data.batching import collate
    from trainer.loop import _forward

    tok = tokenizers["tiny-llama-bpe"]
    ids = tok("The patient reported a mild headache after the first dose.")["input_ids"]
    batch = collate([[(ids, ids)]], tok.pad_token_id, packed=False)
    model = _lora_tiny(torch.bfloat16)
    with torch.no_grad():
        own = _forward(model, batch, "cpu", "bf16", chunked_loss=False).loss.item()
        chunked = _forward(model, batch, "cpu", "bf16", chunked_loss=True).loss.item()
    assert chunked == pytest.approx(own, rel=1e-2)


def test_lever_decisions():
    from trainer.performance import choose_base_dtype, choose_chunked_loss

    assert choose_base_dtype("lora", "bf16").value == "bf16"
    assert choose_base_dtype("qlora", "fp16").value == "fp16"
    assert choose_base_dtype("lora", "fp32").value == "fp32"
    assert choose_base_dtype("full", "bf16").value == "fp32"  # trained weights never drop to bf16

    llama = _lora_tiny()
    assert choose_chunked_loss(llama).value == "on"
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    decision = choose_chunked_loss(gpt2)
    assert decision.value == "off" and "gpt2" in decision.reason


def test_benchmark_feeds_both_sides_the_same_token_ids():
    """The baseline tokenizes `text + eos` itself; the project's text format must give the same ids."""
    from transformers import PreTrainedTokenizerFast

    from bench.model import MAX_TOKENS, MIN_TOKENS, make_rows
    from trainer.data.tokenize import ConversationEncoder, choose_template
    from trainer.models.builtin import get_spec, raw_tokenizer

    raw, names, chat = raw_tokenizer(get_spec("builtin:tiny-llama-bpe"))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, **names)
    tok.chat_template = chat
    rows = make_rows(tok, 3000, seed=1)
    encoder = ConversationEncoder(tok, choose_template("auto", tok)[0], 256, False, "truncate")
    for row in rows:
        project_ids, _ = encoder.encode_text(row["text"])
        baseline_ids = tok(row["text"] + tok.eos_token, truncation=True, max_length=256)["input_ids"]
        assert project_ids == baseline_ids
        assert MIN_TOKENS <= len(project_ids) <= MAX_TOKENS


def test_benchmark_measures():
    from bench.measure import WARMUP_STEPS, after_warmup, lora_flops
    from bench.model import SHAPE

    seconds = [9.0] * WARMUP_STEPS + [1.0, 2.0]
    assert after_warmup(seconds, [5] * WARMUP_STEPS + [100, 200]) == (100.0, 300, 3.0)
    # SmolLM2-135M's 134,515,008 parameters less its 35,136 norm weights are matmul weights (the tied
    # embedding counted once, as the output layer); one token attends to one key.
    assert lora_flops(SHAPE, [1]) == pytest.approx(4 * (134_515_008 - 35_136) + 12 * 576 * 30, rel=1e-9)
