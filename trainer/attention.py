"""Attention for packed training batches on CPU: plain batched matmuls, query heads grouped by KV head.

Packed sequences carry a block-diagonal causal mask (trainer/data/batching.py). With such a mask,
torch's CPU scaled_dot_product_attention runs its flash kernel over every block (no causal skip) and
its backward is slow; for sequences of a few hundred tokens, three batched matmuls and a softmax are
faster (docs/PERFORMANCE.md has the numbers). Grouping the query heads that share a KV head
((B*kv_heads, group*L, D) @ (B*kv_heads, D, L)) avoids copying K and V once per query head as
transformers' eager attention does, and cutting the queries into blocks that only meet the keys up
to their own end skips most of the causal upper triangle. The mask is added in the compute dtype
inside the score product (one baddbmm), and the softmax runs in that dtype with float32
accumulation, rounded once as eager attention's `softmax(float32).to(dtype)` rounds it.

Anything else (no mask, a bool mask, dropout, decoding with a cache) goes to transformers' sdpa
attention unchanged, so evaluation and generation behave as with `attn_implementation="sdpa"`.
The probabilities kept for backward take up to batch x heads x L^2 x 2 bytes per layer (5/8 of that
at 4 query blocks), which is why contract/decisions.py's choose_attention uses this only for short
sequences. Models saved after training do not record this implementation (transformers does not
serialize it), so they load anywhere with the default attention.
"""

from __future__ import annotations

NAME = "llamafarm_packed_cpu"
# Queries go in blocks of about this many positions, each against the keys up to its own end: the
# causal upper triangle is mostly skipped (5/8 of the full score matrix at 4 blocks).
QUERY_BLOCK = 64

_registered = None


def register(compiled: bool = False) -> str:
    """Make NAME a transformers attention implementation (idempotent); returns NAME.

    compiled: the layers around it are torch.compile'd; the function is then excluded from the graph
    (torch would otherwise specialize on its width-dependent query blocks and recompile per width)."""
    global _registered
    if _registered != compiled:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        function = grouped_matmul_attention
        if compiled:
            import torch

            function = torch.compiler.disable(grouped_matmul_attention)
        AttentionInterface.register(NAME, function)
        # 2-D padding masks (evaluation batches) become the same 4-D masks sdpa gets.
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = compiled
    return NAME


class _MaskCache:
    """The current batch's mask, cut per query block: every layer of one forward gets the same mask
    tensor, so it is expanded and cast once per batch, not once per layer."""

    source = None
    dtype = None
    parts: list = []


def grouped_matmul_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention-function signature: query (B, H, L, D), key/value (B, KV, S, D);
    returns ((B, L, H, D), None)."""
    import torch

    fast = (
        attention_mask is not None
        and attention_mask.dim() == 4
        and attention_mask.dtype.is_floating_point
        and not dropout
        and query.shape[2] == key.shape[2]
        and kwargs.get("softcap") is None
    )
    if not fast:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, heads, n, d = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    if _MaskCache.source is not attention_mask or _MaskCache.dtype != query.dtype:
        cuts = [round(i * n / max(1, n // QUERY_BLOCK)) for i in range(max(1, n // QUERY_BLOCK) + 1)]
        full = attention_mask.to(query.dtype)[:, :, None].expand(b, kv_heads, group, n, n)
        # Block i of queries sees keys up to its own end only (causal): (B * kv_heads, group * rows, keys)
        _MaskCache.parts = [(q0, q1, full[:, :, :, q0:q1, :q1].reshape(b * kv_heads, group * (q1 - q0), q1))
                            for q0, q1 in zip(cuts, cuts[1:])]
        _MaskCache.source, _MaskCache.dtype = attention_mask, query.dtype
    # Query heads h = kv * group + g (the order repeat_kv gives) are contiguous per KV head.
    q = query.reshape(b * kv_heads, group, n, d)
    k = key.reshape(b * kv_heads, n, d)
    v = value.reshape(b * kv_heads, n, d)
    scale = scaling if scaling is not None else d ** -0.5
    outs = []
    for q0, q1, mask in _MaskCache.parts:
        block = q[:, :, q0:q1].reshape(b * kv_heads, group * (q1 - q0), d)
        scores = torch.baddbmm(mask, block, k[:, :q1].transpose(1, 2), alpha=scale)
        outs.append(torch.bmm(torch.softmax(scores, dim=-1), v[:, :q1]).view(b * kv_heads, group, q1 - q0, d))
    out = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)).view(b, heads, n, d)
    return out.transpose(1, 2).contiguous(), None
