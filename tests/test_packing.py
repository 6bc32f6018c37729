"""Packing: rows share a sequence without seeing each other."""

from __future__ import annotations

import pytest

from trainer.data.batching import collate, pack
from trainer.data.tokenize import IGNORE_INDEX
from trainer.loop import make_sequences, padding_fraction


def test_pack_best_fit_decreasing_golden():
    rows = [([0] * n, [0] * n) for n in (60, 50, 30, 70, 10, 40)]
    # 70, 60, 50 open sequences; 40 fills 60's exactly, 30 fills 70's, 10 goes to the one with room left.
    assert pack(rows, 100, list(range(6))) == [[3, 2], [0, 5], [1, 4]]
    assert pack(rows, 100, [3, 0, 1, 2, 4, 5]) == [[3, 2], [0, 5], [1, 4]], "distinct lengths: order irrelevant"
    same = [([0] * 50, [0] * 50)] * 3
    assert pack(same, 100, [2, 0, 1]) == [[2, 0], [1]], "equal lengths keep the seeded order"


def test_padding_fraction():
    rows = [([0] * n, [0] * n) for n in (10, 30, 20, 20)]
    unpacked = make_sequences(rows, 64, packed=False, seed=0)
    assert padding_fraction(unpacked, 2) == pytest.approx(1 - 80 / (2 * 30 + 2 * 20))
    packed = make_sequences(rows, 64, packed=True, seed=0)
    assert [[len(r[0]) for r in s] for s in packed] == [[30, 20, 10], [20]], "longest first, best fit"
    assert padding_fraction(packed, 1) == 0.0 and padding_fraction(packed, 2) == pytest.approx(1 - 80 / 120)


def test_packed_batches_are_length_grouped_and_deterministic():
    """Each sequence once per epoch; the order is a function of (seed, epoch); batches cut from
    length-sorted groups pad far less than batches in plain shuffled order."""
    import random

    from trainer.loop import _epoch_batches

    rng = random.Random(0)
    rows = [([0] * n, [0] * n) for n in (rng.randint(64, 256) for _ in range(400))]
    sequences = make_sequences(rows, 256, packed=True, seed=3)
    batches = _epoch_batches(sequences, 5, seed=3, epoch=1, packed=True)
    assert sorted(id(s) for b in batches for s in b) == sorted(id(s) for s in sequences)
    assert batches == _epoch_batches(sequences, 5, seed=3, epoch=1, packed=True)
    assert batches != _epoch_batches(sequences, 5, seed=3, epoch=2, packed=True)
    grouped = padding_fraction(sequences, 5, seed=3, packed=True)
    plain = padding_fraction(sequences, 5, seed=3, packed=False)
    assert grouped < plain / 3, (grouped, plain)


def _per_example_losses(model, batch, segments_per_row):
    import torch

    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids).logits.float()
    losses = []
    for r, lengths in enumerate(segments_per_row):
        at = 0
        for n in lengths:
            lg = logits[r, at : at + n - 1]
            lb = batch.labels[r, at + 1 : at + n]
            keep = lb != IGNORE_INDEX
            losses.append(torch.nn.functional.cross_entropy(lg[keep], lb[keep]).item())
            at += n
    return losses


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(tokenizers, attention):
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import DATASETS
    from inputs.data.records import read_dataset
    from trainer.data.tokenize import ConversationEncoder, choose_template
    from trainer.models.builtin import builtin_path

    tok = tokenizers["tiny-llama-bpe"]
    model = AutoModelForCausalLM.from_pretrained(
        builtin_path("builtin:tiny-llama-bpe"), attn_implementation=attention, dtype=torch.float32
    ).eval()
    # Make every attention uniform over the tokens it may see (zero queries give equal scores) and
    # weigh it up in the residual stream; the first row below is one token repeated. A row that could
    # see it would average mostly that token's values in: a large change by construction, whatever the
    # builtin's weights are on this machine (a sharpened trained attention leaked only 0.004 on one
    # build). The block mask must still make packed and alone agree exactly.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.zero_()
            layer.self_attn.o_proj.weight.mul_(8)
    template, _ = choose_template("auto", tok)
    enc = ConversationEncoder(tok, template, 256, False, "truncate")
    rows, _ = enc.encode_all(read_dataset(DATASETS / "medical_qa.jsonl")[:4])
    repeated = [tok.convert_tokens_to_ids(tok.tokenize(" the"))[0]] * 200
    rows = [(repeated, repeated), *rows]
    pad = tok.pad_token_id
    with torch.no_grad():
        alone = [
            _per_example_losses(model, collate([[row]], pad, block_mask=False), [[len(row[0])]])[0] for row in rows
        ]
        packed_batch = collate([[rows[0], rows[1], rows[2]], [rows[3], rows[4]]], pad, block_mask=True)
        together = _per_example_losses(
            model, packed_batch, [[len(rows[i][0]) for i in (0, 1, 2)], [len(rows[i][0]) for i in (3, 4)]]
        )
        leaky = collate([[rows[0], rows[1], rows[2]]], pad, block_mask=False)  # one row, no block mask
        leaked = _per_example_losses(model, leaky, [[len(rows[i][0]) for i in (0, 1, 2)]])
    assert together == pytest.approx(alone, abs=1e-5)
    assert abs(leaked[1] - alone[1]) > 0.1, "without the block mask the second row sees the first"
    assert packed_batch.attention_mask.shape[1] == 1 and packed_batch.attention_mask.dim() == 4


def test_first_label_of_each_packed_row_is_masked():
    rows = [([5, 6, 7], [5, 6, 7]), ([8, 9], [8, 9])]
    batch = collate([rows], pad_id=0, block_mask=True)
    assert batch.labels.tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert (batch.real_tokens, batch.target_tokens, batch.positions) == (5, 3, 5)
