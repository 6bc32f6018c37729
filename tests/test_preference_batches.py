"""Pairs in a batch: the chosen and rejected answers are separate padded rows, so each row's
log-prob equals the row run alone (as the SFT packing test checks for packed rows)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from trainer.data.preference import PairRows  # noqa: E402
from trainer.preference import PreferenceObjective, sequence_logps  # noqa: E402


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _row(ids, prompt):
    return list(ids), [-100] * prompt + list(ids[prompt:])


def test_each_answer_scores_as_if_alone():
    from contextlib import nullcontext

    model = _model()
    pairs = [PairRows(_row(range(3, 15), 4), _row(range(5, 11), 4)),
             PairRows(_row(range(20, 29), 3), _row(range(1, 20), 3))]
    objective = PreferenceObjective("dpo", None, pad_id=0, device="cpu", autocast=nullcontext)
    batch = objective.collate(pairs)
    assert batch.input_ids.shape[0] == 4 and batch.attention_mask.dim() == 2  # rows, not packed
    together, counts = sequence_logps(model, batch, "cpu", nullcontext())
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    for i, row in enumerate(rows):
        alone, n = sequence_logps(model, objective.collate([PairRows(row, row)]), "cpu", nullcontext())
        assert counts[i] == n[0] == len(row[0]) - max(4 if i % 2 == 0 else 3, 1)
        assert torch.allclose(together[i], alone[0], atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_chunked_log_probs_equal_the_models_own(precision, monkeypatch):
    """The chunked head (answer positions only, logits recomputed in backward) gives the same per-row
    log-probs and the same gradients as log_softmax over the model's own logits, with chunks smaller
    than a row so the chunk edges are crossed."""
    from contextlib import nullcontext

    from trainer import chunked_loss

    monkeypatch.setattr(chunked_loss, "chunk_rows", lambda vocab: 5)
    model = _model().train()
    pairs = [PairRows(_row(range(3, 15), 4), _row(range(5, 11), 4)),
             PairRows(_row(range(20, 29), 3), _row(range(1, 20), 3))]
    batch = PreferenceObjective("dpo", None, pad_id=0, device="cpu", autocast=nullcontext).collate(pairs)
    weights = torch.linspace(-1.0, 2.0, 4)  # a different upstream gradient per row, as DPO's loss gives
    results = []
    for chunked in (False, True):
        model.zero_grad()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        logps, counts = sequence_logps(model, batch, "cpu", autocast, chunked=chunked)
        (logps * weights).sum().backward()
        results.append((logps.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_counts, plain_grads), (chunked_logps, chunked_counts, chunked_grads) = results
    assert torch.equal(plain_counts, chunked_counts)
    tolerance = dict(rtol=1e-5, atol=1e-5) if precision == "fp32" else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(chunked_logps, plain, **tolerance)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, **tolerance, msg=name)


@pytest.mark.parametrize("kernel", ["grouped-matmul", "blockwise"])
def test_pairs_under_our_cpu_attention_score_as_under_the_padding_mask(kernel):
    """On CPU pairs go through our attention kernels with the block mask (contract/decisions.py block_mask):
    each padded row's log-prob and the gradients equal sdpa's under the (rows, length) padding mask."""
    from contextlib import nullcontext

    from contract.decisions import Decision
    from trainer.performance import use_attention

    pairs = [PairRows(_row(range(3, 15), 4), _row(range(5, 11), 4)),
             PairRows(_row(range(20, 29), 3), _row(range(1, 20), 3))]
    model = _model().train()
    results = []
    for block_mask in (False, True):
        objective = PreferenceObjective("dpo", None, pad_id=0, device="cpu", autocast=nullcontext, block_mask=block_mask)
        batch = objective.collate(pairs)
        assert batch.attention_mask.dim() == (4 if block_mask else 2)
        if block_mask:
            use_attention(model, Decision(kernel, "test"))
        model.zero_grad()
        logps, counts = sequence_logps(model, batch, "cpu", nullcontext())
        (logps * torch.linspace(-1.0, 2.0, 4)).sum().backward()
        results.append((logps.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_counts, plain_grads), (ours, our_counts, our_grads) = results
    assert model.config._attn_implementation != "sdpa"  # ours did run
    assert torch.equal(plain_counts, our_counts)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
