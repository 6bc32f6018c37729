"""Rows to model inputs: padding, or packing several rows into one sequence.

Packing puts rows end to end so no compute goes to padding. Attention must not cross rows: each
packed sequence gets a 4-D block-diagonal causal mask (additive 0 / large negative, the form both the
sdpa and eager attention honour on CPU; a bool mask is silently wrong with eager) and position ids
that restart at every row. Position ids alone do NOT separate rows with sdpa or eager attention.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.data.tokenize import IGNORE_INDEX

Row = tuple[list[int], list[int]]  # (input_ids, labels)


@dataclass
class Batch:
    input_ids: object
    labels: object
    attention_mask: object  # (B, L) of 0/1, or (B, 1, L, L) additive (block_mask)
    position_ids: object
    real_tokens: int
    target_tokens: int
    positions: int  # B * L, real and padding


def sequence_length(sequence: list[Row]) -> int:
    """Tokens in a training sequence (its rows packed end to end)."""
    return sum(len(ids) for ids, _ in sequence)


def pack(rows: list[Row], max_len: int, order: list[int]) -> list[list[int]]:
    """Group row indices into sequences of at most max_len tokens: best fit decreasing.

    Rows go longest first (equal lengths keep their place in `order`, the seeded shuffle), each into
    the sequence with the least room that still holds it, so sequences come out as full as the row
    lengths allow. With the length-grouped batches of trainer/loop, the benchmark's 64-256-token rows
    packed to 256 leave 1.3% of positions as padding, against 9.5% with first fit in shuffled order."""
    import bisect

    bins: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, sequence index), sorted; full sequences leave it
    for i in sorted(order, key=lambda i: -len(rows[i][0])):
        n = len(rows[i][0])
        k = bisect.bisect_left(rooms, (n, -1))
        if k < len(rooms):
            room, b = rooms.pop(k)
            bins[b].append(i)
        else:
            room, b = max_len, len(bins)
            bins.append([i])
        if room > n:
            bisect.insort(rooms, (room - n, b))
    return bins


def _targets(labels: list[int]) -> int:
    return sum(label != IGNORE_INDEX for label in labels[1:])


def collate(sequences: list[list[Row]], pad_id: int, block_mask: bool, mask_dtype=None) -> Batch:
    """Build one batch. Each sequence is a list of rows: one row unpacked, several when packed.

    block_mask: the 4-D block-diagonal causal mask (contract/decisions.py block_mask: packed batches and our
    CPU attention kernels), else a (B, L) padding mask."""
    import torch

    lengths = [sequence_length(seq) for seq in sequences]
    width = max(lengths)
    b = len(sequences)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    segments = torch.full((b, width), -1, dtype=torch.long)  # -1 marks padding
    targets = 0
    for r, seq in enumerate(sequences):
        at = 0
        for s, (ids, labs) in enumerate(seq):
            n = len(ids)
            input_ids[r, at : at + n] = torch.tensor(ids)
            labs = list(labs)
            labs[0] = IGNORE_INDEX  # never predicted from the previous row's last token
            labels[r, at : at + n] = torch.tensor(labs)
            position_ids[r, at : at + n] = torch.arange(n)
            segments[r, at : at + n] = s
            targets += _targets(labs)
            at += n
    real = segments >= 0
    if block_mask:
        causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
        allowed = (segments[:, :, None] == segments[:, None, :]) & causal & real[:, None, :]
        # A padding query may attend to itself only, which keeps its softmax finite.
        allowed |= torch.eye(width, dtype=torch.bool) & ~real[:, :, None]
        dtype = mask_dtype or torch.float32
        mask = torch.zeros((b, 1, width, width), dtype=dtype)
        mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    else:
        mask = real.long()
    return Batch(input_ids, labels, mask, position_ids, int(real.sum()), targets, b * width)
