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
