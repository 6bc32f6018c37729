"""Attention for training batches on CPU: two kernels, query heads grouped by KV head.

Packed sequences carry a block-diagonal causal mask (trainer/data/batching.py), and so do unpacked rows
here, one sequence per row (contract/decisions.py block_mask). With such a mask,
torch's CPU scaled_dot_product_attention computes every block of the score matrix (no causal skip, no
skipping of the other packed rows) and its backward is slow. Both kernels here instead group the query
heads that share a KV head ((B*kv_heads, group*rows, D) @ (B*kv_heads, D, keys): no copy of K and V per
query head, unlike transformers' eager attention) and cut the queries into blocks of ~64 positions that
only meet the keys up to their own end, skipping most of the causal upper triangle:

- grouped_matmul_attention: three batched matmuls and a softmax per block under autograd, which keeps
  the softmax probabilities for backward: batch x heads x ~L^2/2 values per layer, quadratic in L.
- blockwise_attention (flash-style, _Blockwise): each block also skips the keys before the first one
  any of its queries may see (read off the mask once per batch: for packed rows, the block meets only
  the rows it lies in), and only q, k and v are kept for backward (q as its pre-scaled blocks, in
  place of the input, which the model then frees), linear in L. Backward recomputes each block's scores
  and softmax and applies the softmax backward with dK and dV accumulated in float32. Where the
  attention_softmax decision chose it, our C++ kernel (trainer/softmax_kernel.py) adds the mask and takes
  the softmax in one pass, keeping each row's log-sum-exp, and backward recomputes the probabilities
  from it in one more (exp(scores + mask - lse)) instead of a second softmax. Every operand
  of its batched matmuls is contiguous (torch's CPU bmm copies any other), and the gradients come out
  in the projections' (B, L, heads, D) memory order.

contract/decisions.py choose_attention picks between them by measured speed (grouped matmuls up to 256
tokens, blockwise beyond; bench/attention.py, docs/PERFORMANCE.md). The mask is added in the compute
dtype, and the softmax runs in that dtype with float32 accumulation, rounded once as eager attention's
`softmax(float32).to(dtype)` rounds it. The compute dtype is autocast's when it is on, else the inputs', except
on CPUs without bf16 matmul instructions, where bf16 inputs are computed in float32 (emulated bf16
matmuls are ~10x slower there) and the results cast back.

Anything else (no mask, a bool mask, dropout, decoding with a cache, soft-capping) goes to transformers'
sdpa attention unchanged, so evaluation and generation behave as with `attn_implementation="sdpa"`.
Models saved after training do not record these implementations (transformers does not serialize
them), so they load anywhere with the default attention.
"""

from __future__ import annotations

NAME = "llamafarm_packed_cpu"
BLOCKWISE_NAME = "llamafarm_blockwise_cpu"
# Queries go in blocks of about this many positions, each against the keys up to its own end: the
# causal upper triangle is mostly skipped (5/8 of the full score matrix at 4 blocks).
QUERY_BLOCK = 64
# The blockwise kernel's query blocks (measured: bench/attention.py).
BLOCKWISE_QUERY_BLOCK = 64

_registered: dict = {}


def register(kernel: str = "grouped-matmul", compiled: bool = False) -> str:
    """Make the kernel ("grouped-matmul" or "blockwise", contract/decisions.py choose_attention's
    values) a transformers attention implementation (idempotent); returns its name.

    compiled: the layers around it are torch.compile'd; the function is then excluded from the graph
    (torch would otherwise specialize on its width-dependent query blocks and recompile per width)."""
    name, function = {"grouped-matmul": (NAME, grouped_matmul_attention),
                      "blockwise": (BLOCKWISE_NAME, blockwise_attention)}[kernel]
    if _registered.get(name) != compiled:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        if compiled:
            import torch

            function = torch.compiler.disable(function)
        AttentionInterface.register(name, function)
        # 2-D padding masks (evaluation batches) become the same 4-D masks sdpa gets.
        AttentionMaskInterface.register(name, sdpa_mask)
        _registered[name] = compiled
    return name


def kernel_of(implementation: str) -> str | None:
    """The kernel a model's attn_implementation names, None when it is not one of ours."""
    return {NAME: "grouped-matmul", BLOCKWISE_NAME: "blockwise"}.get(implementation)


def _block_masked(query, key, attention_mask, dropout, kwargs) -> bool:
    """A training forward under the block mask: a 4-D additive float mask, no dropout, no cache."""
    return (attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype.is_floating_point
            and not dropout and query.shape[2] == key.shape[2] and kwargs.get("softcap") is None)


def _sdpa(module, query, key, value, attention_mask, dropout, scaling, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _cuts(n: int, block: int) -> list[int]:
    """Boundaries of about-`block`-row query blocks over n positions (the last no shorter than the others)."""
    count = max(1, n // block)
    return [round(i * n / count) for i in range(count + 1)]


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

    if not _block_masked(query, key, attention_mask, dropout, kwargs):
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    b, heads, n, d = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    compute = compute_dtype(query.dtype)
    if _MaskCache.source is not attention_mask or _MaskCache.dtype != compute:
        cuts = _cuts(n, QUERY_BLOCK)
        full = attention_mask.to(compute)[:, :, None].expand(b, kv_heads, group, n, n)
        # Block i of queries sees keys up to its own end only (causal): (B * kv_heads, group * rows, keys)
        _MaskCache.parts = [(q0, q1, full[:, :, :, q0:q1, :q1].reshape(b * kv_heads, group * (q1 - q0), q1))
                            for q0, q1 in zip(cuts, cuts[1:])]
        _MaskCache.source, _MaskCache.dtype = attention_mask, compute
    # Query heads h = kv * group + g (the order repeat_kv gives) are contiguous per KV head.
    q = query.to(compute).reshape(b * kv_heads, group, n, d)
    k = key.to(compute).reshape(b * kv_heads, n, d)
    v = value.to(compute).reshape(b * kv_heads, n, d)
    scale = scaling if scaling is not None else d ** -0.5
    outs = []
    with torch.autocast("cpu", enabled=False):  # autocast's dtype is already the inputs'
        for q0, q1, mask in _MaskCache.parts:
            block = q[:, :, q0:q1].reshape(b * kv_heads, group * (q1 - q0), d)
            scores = torch.baddbmm(mask, block, k[:, :q1].transpose(1, 2), alpha=scale)
            outs.append(torch.bmm(torch.softmax(scores, dim=-1), v[:, :q1]).view(b * kv_heads, group, q1 - q0, d))
    out = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)).view(b, heads, n, d)
    return out.transpose(1, 2).to(query.dtype, memory_format=torch.contiguous_format), None


class _BlockCache:
    """The current batch's query blocks for the blockwise kernel, shared by every layer of a forward
    (and their backward): (q0, q1, k0, mask) per block, k0 the first key any query of the block may
    see, mask the block's (B, 1, rows, 1, keys) slice of the mask in the compute dtype."""

    source = None
    dtype = None
    blocks: list = []


def visible_keys(attention_mask):
    """(B, L, L) uint8, 1 where a query may see a key: a key whose mask value is this negative gets exactly
    zero weight (exp underflows). uint8 rather than bool: torch reduces bools ~15x slower."""
    import torch

    mask = attention_mask[:, 0]
    return (mask > torch.finfo(mask.dtype).min / 2).view(torch.uint8)


class _FirstKeyCache:
    """The current batch's first visible key per query, read once per batch: the blockwise blocks and the
    packed sequences of trainer/attention_segments.py both start from it."""

    source = None
    first = None


def first_visible_keys(attention_mask, seen=None):
    """(B, L): the first key each query sees (0 when it sees none); `seen`: visible_keys of the mask, when
    the caller has it already."""
    if _FirstKeyCache.source is not attention_mask:
        _FirstKeyCache.first = (visible_keys(attention_mask) if seen is None else seen).argmax(-1)
        _FirstKeyCache.source = attention_mask
    return _FirstKeyCache.first


def _blocks(attention_mask, n: int, dtype) -> list:
    if _BlockCache.source is not attention_mask or _BlockCache.dtype != dtype:
        mask = attention_mask[:, 0]
        # A block's keys before the first one any of its queries may see are skipped: for packed
        # sequences the block meets only the rows it lies in, not the whole triangle.
        first = first_visible_keys(attention_mask)
        cuts = _cuts(n, BLOCKWISE_QUERY_BLOCK)
        blocks = []
        for q0, q1 in zip(cuts, cuts[1:]):
            k0 = int(first[:, q0:q1].min())
            part = mask[:, q0:q1, k0:q1].to(dtype)
            if part.stride(-1) != 1:  # our softmax kernel reads each mask row as contiguous keys
                part = part.contiguous()
            blocks.append((q0, q1, k0, part[:, None, :, None, :]))
        _BlockCache.blocks, _BlockCache.source, _BlockCache.dtype = blocks, attention_mask, dtype
    return _BlockCache.blocks


def blockwise_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention-function signature, as grouped_matmul_attention; keeps only its inputs
    q, k and v for backward (see _Blockwise)."""
    if not _block_masked(query, key, attention_mask, dropout, kwargs):
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    import torch

    from trainer import attention_segments

    compute = compute_dtype(query.dtype)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    spans = attention_segments.applies(attention_mask)
    with torch.autocast("cpu", enabled=False):  # autocast's dtype is already the inputs'
        if spans is not None:  # long packed sequences: torch's flash kernel per sequence
            return attention_segments.attention(query, key, value, spans, scale, compute), None
        return blockwise(query, key, value, attention_mask, scale, compute), None


def blockwise(query, key, value, attention_mask, scale: float, compute):
    """The blockwise kernel itself on a packed batch: (B, L, H, D) in the query's dtype."""
    blocks = _blocks(attention_mask, query.shape[2], compute)
    return _blockwise_function().apply(query, key, value, blocks, scale, compute)


_bf16 = None


def compute_dtype(dtype):
    """Autocast's dtype when it is on (eager attention's matmuls would run in it; and with float32
    weights the rotary embedding hands over q and k in float32, which would make a full fine-tune's
    attention several times slower than its bf16 matmuls), else the inputs' dtype; float32 for bf16 on a
    CPU without bf16 matmul instructions (AVX512-BF16 or AMX): emulated bf16 matmuls run ~10x slower
    than float32 ones there."""
    import torch

    global _bf16
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
    if dtype != torch.bfloat16:
        return dtype
    if _bf16 is None:
        from contract.decisions import cpu_has_bf16

        _bf16 = cpu_has_bf16()
    return dtype if _bf16 else torch.float32


_function = None
# The blockwise kernel's masked softmax: our C++ kernel (trainer/softmax_kernel.py) when the
# attention_softmax decision chose it, else None (torch's operators, _probabilities).
_softmax_kernel = None


def use_softmax_kernel(kernel) -> None:
    global _softmax_kernel
    _softmax_kernel = kernel


def _blockwise_function():
    """The torch.autograd.Function, defined on first use (importing this module needs no torch)."""
    global _function
    if _function is None:
        _function = _define_blockwise()
    return _function


def _define_blockwise():
    import torch

    def block_queries(query, kv, q0, q1, scale, compute):
        """Query positions q0..q1 pre-scaled, in the compute dtype and the grouped layout, contiguous:
        (B * kv_heads, rows * group, D), row p * group + g being query head kv * group + g at position p,
        so a block meets its keys in one batched matmul per KV head. Contiguous per block because torch's
        CPU bmm copies any operand whose matrices are not (a slice along the rows is not)."""
        b, heads, _, d = query.shape
        part = query[:, :, q0:q1].unflatten(1, (kv, heads // kv)).transpose(2, 3)  # (B, kv, rows, g, D)
        out = torch.empty(part.shape, dtype=compute)
        torch.mul(part, scale, out=out)  # the scale and the layout in one pass
        return out.view(b * kv, -1, d)

    def grouped_keys(key, compute):
        """k or v in the compute dtype as (B * kv_heads, L, D): a block's keys are a slice of its rows."""
        b, kv, n, d = key.shape
        return key.to(compute).reshape(b * kv, n, d)

    class _Blockwise(torch.autograd.Function):
        """Attention per query block, keeping for backward only q (as its pre-scaled blocks), k and v.
        Backward recomputes each block's scores and softmax and applies the softmax backward (torch's own
        kernel: dS = P * (dP - rowsum(dP * P)), the rowsum being flash attention's D = rowsum(dO * O))
        with dK and dV accumulated over the blocks in float32. Every gradient is written in the memory
        order of (B, L, heads, D), the projections' own, so none needs a copy on its way back to them."""

        @staticmethod
        def forward(ctx, query, key, value, blocks, scale, compute):
            b, heads, n, d = query.shape
            kv = key.shape[1]
            g = heads // kv
            k, v = grouped_keys(key, compute), grouped_keys(value, compute)
            queries = [block_queries(query, kv, q0, q1, scale, compute) for q0, q1, _, _ in blocks]
            out = torch.empty(b, n, kv, g, d, dtype=compute)
            view = out.permute(0, 2, 1, 3, 4)  # (B, kv, L, g, D) view of the (B, L, H, D) result
            softmax = _softmax_kernel if compute in (torch.bfloat16, torch.float32) else None
            lses = []  # with our softmax kernel: each block's row log-sum-exps, for backward's recompute
            for (q0, q1, k0, mask), q in zip(blocks, queries):
                kb = k[:, k0:q1].contiguous()
                if softmax is None:
                    p = _probabilities(q, kb, b, kv, g, q1 - q0, mask)
                else:
                    p = torch.bmm(q, kb.transpose(1, 2))
                    lses.append(softmax.softmax_(p, mask, kv, g))
                view[:, :, q0:q1] = torch.bmm(p, v[:, k0:q1].contiguous()).view(b, kv, q1 - q0, g, d)
            ctx.save_for_backward(k, v, *queries, *lses)
            ctx.blocks, ctx.scale, ctx.dtypes = blocks, scale, (query.dtype, key.dtype, value.dtype)
            ctx.softmax = softmax
            return out.view(b, n, heads, d).to(query.dtype)

        @staticmethod
        def backward(ctx, grad):
            k, v, *saved = ctx.saved_tensors
            queries, lses = saved[:len(ctx.blocks)], saved[len(ctx.blocks):]
            b, n, heads, d = grad.shape
            kv = k.shape[0] // b
            g = heads // kv
            do = grad.to(k.dtype).reshape(b, n, kv, g, d)
            dq = torch.empty(b, n, kv, g, d, dtype=ctx.dtypes[0])
            dk = torch.zeros(b, n, kv, d, dtype=torch.float32)
            dv = torch.zeros(b, n, kv, d, dtype=torch.float32)
            dq_view, dk_view, dv_view = dq.permute(0, 2, 1, 3, 4), dk.permute(0, 2, 1, 3), dv.permute(0, 2, 1, 3)
            for i, ((q0, q1, k0, mask), q) in enumerate(zip(ctx.blocks, queries)):
                rows, keys = q1 - q0, q1 - k0
                kb, vb = k[:, k0:q1].contiguous(), v[:, k0:q1].contiguous()
                dob = do[:, q0:q1].permute(0, 2, 1, 3, 4).reshape(b * kv, rows * g, d)
                if ctx.softmax is None:
                    p = _probabilities(q, kb, b, kv, g, rows, mask)
                else:  # the forward's probabilities again: exp(scores + mask - lse), one pass
                    p = torch.bmm(q, kb.transpose(1, 2))
                    ctx.softmax.exp_(p, mask, lses[i], kv, g)
                dv_view[:, :, k0:q1].add_(torch.bmm(p.transpose(1, 2), dob).view(b, kv, keys, d))
                ds = torch._softmax_backward_data(torch.bmm(dob, vb.transpose(1, 2)), p, -1, p.dtype)
                torch.mul(torch.bmm(ds, kb).view(b, kv, rows, g, d), ctx.scale, out=dq_view[:, :, q0:q1])
                dk_view[:, :, k0:q1].add_(torch.bmm(ds.transpose(1, 2), q).view(b, kv, keys, d))
            return (dq.view(b, n, heads, d).transpose(1, 2), dk.to(ctx.dtypes[1]).transpose(1, 2),
                    dv.to(ctx.dtypes[2]).transpose(1, 2), None, None, None)

    return _Blockwise


def _probabilities(q, k, b, kv, g, rows, mask):
    """Softmax of one query block's scores (q: the block's grouped queries, k: the keys it meets, both
    contiguous), the mask added in the compute dtype; torch's softmax accumulates in float32."""
    import torch

    scores = torch.bmm(q, k.transpose(1, 2))
    scores.view(b, kv, rows, g, k.shape[1]).add_(mask)
    return torch.softmax(scores, dim=-1)
