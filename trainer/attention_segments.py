"""Long packed sequences through a causal attention kernel, one sequence at a time.

A packed batch row holds several sequences under a block-diagonal causal mask. The blockwise kernel
(trainer/attention.py) computes each 64-query block against all the keys of its own sequence at once
in batched products; for a long sequence that score block outgrows the core's cache (3 KV heads x 192
rows x 2,048 keys of float32 is 4.7 MB against a 2 MB L2 on the Intel kind), and a flash kernel, which
tiles the keys too and keeps only the output and each row's log-sum-exp for backward, is faster there.
The kernel per sequence is the sequence_kernel decision's: our C++ flash kernel (trainer/flash_kernel.py)
where it measured faster than torch's (`scaled_dot_product_attention(is_causal=True)`, K and V shared
by their query heads with `enable_gqa`), else torch's. The blockwise kernel stays as fast or faster for
short sequences in several batch rows, where a kernel per sequence pays a call each. So the sequences
are read off the mask, and a batch whose sequences are long (their token-weighted mean length,
sum(L^2) / sum(L), which is what attention costs per token, at least the measured crossover) runs each
sequence through the kernel per sequence. Padding positions attend only to themselves: their output is
their value, copied, no kernel call.

Why a measured crossover: it is a property of the CPU, the dtype, the batch rows and the kernel per
sequence (on the Zen kind in bf16 the blockwise kernel was faster than torch's at every length), so
`crossover` reads it off a short measurement at the job's lengths, cached per machine
(contract/machine_cache.py), and the attention_segments decision (trainer/performance.py) records it.
"""

from __future__ import annotations

CACHE_KIND = "attention_segments"  # contract/machine_cache.py
# Single sequences of these lengths (those within the job's max_seq_length) are timed both ways.
MEASURE_LENGTHS = (128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096)
# ... in batches of the job's rows, up to this many (the measurement's time grows with them).
MEASURE_ROWS = 4

# Sequences from this token-weighted mean length on go through the kernel per sequence; None: never (the
# attention_segments decision sets it, trainer/performance.py use_attention_segments).
_from_length: int | None = None


def use_from(length: int | None) -> None:
    global _from_length
    _from_length = length


class _SpanCache:
    """The current batch's sequences per row, read once per batch and shared by every layer."""

    source = None
    spans = None


def spans_of(attention_mask) -> list | None:
    """Per batch row, the spans (start, end, causal) that tile it: each packed sequence causal, each run
    of padding positions (a position that sees only itself) not. None when the mask is not block-diagonal
    causal (every query sees exactly the keys from its sequence's start up to itself), which then goes to
    the blockwise kernel as it is."""
    import torch

    if _SpanCache.source is attention_mask:
        return _SpanCache.spans
    from trainer.attention import first_visible_keys, visible_keys

    seen = visible_keys(attention_mask)
    n = seen.shape[-1]
    position = torch.arange(n)
    first = first_visible_keys(attention_mask, seen)  # (B, L), kept for the blockwise kernel's blocks
    count = seen.sum(-1, dtype=torch.int32)
    last = n - 1 - seen.flip(-1).argmax(-1)
    starts = first == position
    # A query at a sequence's start begins it; every other query continues the sequence of the one before.
    continues = torch.cat([starts[:, :1], first[:, 1:] == first[:, :-1]], dim=1)
    spans = None
    if bool(((last == position) & (count == position - first + 1) & (starts | continues)).all()):
        spans = [_row_spans(row.tolist(), n) for row in first]
    _SpanCache.source, _SpanCache.spans = attention_mask, spans
    return spans


def _row_spans(first: list[int], n: int) -> list[tuple[int, int, bool]]:
    """Spans of one row from each query's first visible key; one-position sequences (padding) that follow
    each other merge into one non-causal span."""
    spans: list[tuple[int, int, bool]] = []
    starts = [i for i in range(n) if first[i] == i] + [n]
    for start, end in zip(starts, starts[1:]):
        single = end - start == 1
        if single and spans and not spans[-1][2]:
            spans[-1] = (spans[-1][0], end, False)
        else:
            spans.append((start, end, not single))
    return spans


def weighted_length(spans: list) -> float:
    """sum(L^2) / sum(L) over the batch's sequences (padding excluded): attention's cost per token."""
    lengths = [end - start for row in spans for start, end, causal in row if causal]
    return sum(n * n for n in lengths) / max(1, sum(lengths))


def applies(attention_mask) -> list | None:
    """The batch's spans when it should go through the kernel per sequence, else None."""
    if _from_length is None:
        return None
    spans = spans_of(attention_mask)
    return spans if spans is not None and weighted_length(spans) >= _from_length else None


# Our flash kernel (trainer/flash_kernel.py) when the sequence_kernel decision chose it, else None: torch's.
_flash = None


def use_flash_kernel(kernel) -> None:
    global _flash
    _flash = kernel


def attention(query, key, value, spans, scale: float, compute):
    """query (B, H, L, D), key/value (B, KV, L, D); returns (B, L, H, D) in the query's dtype."""
    if _flash is not None:
        from trainer import flash_kernel

        inputs = (query, key, value)
        if not _flash.takes(*inputs):  # mixed dtypes (autocast): all in the compute dtype
            inputs = tuple(t.to(compute) for t in inputs)
        if _flash.takes(*inputs):  # it sums in float32 whatever the inputs' dtype
            return flash_kernel.attention(_flash, *inputs, spans, scale).to(query.dtype)
    return torch_attention(query, key, value, spans, scale, compute)


def torch_attention(query, key, value, spans, scale: float, compute):
    """`attention` through torch's causal kernel, one call per sequence."""
    import torch
    import torch.nn.functional as F

    group = query.shape[1] // key.shape[1]
    rows = []
    for b, row in enumerate(spans):
        parts = []
        for start, end, causal in row:
            v = value[b:b + 1, :, start:end].to(compute)
            if not causal:  # padding: each position sees only itself, so its output is its value
                parts.append(v.repeat_interleave(group, dim=1))
                continue
            q = query[b:b + 1, :, start:end].to(compute)
            k = key[b:b + 1, :, start:end].to(compute)
            parts.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=group > 1))
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).to(query.dtype, memory_format=torch.contiguous_format)


def crossover(timed: dict[int, dict[str, float]]) -> int | None:
    """The shortest measured length from which the kernel per sequence was faster at every longer measured
    length too; None when it was not faster at the longest. `timed`: {length: {"segments_ms", "blockwise_ms"}}."""
    found = None
    for length in sorted(timed, reverse=True):
        if timed[length]["segments_ms"] >= timed[length]["blockwise_ms"]:
            break
        found = length
    return found


def measure_rows(batch_size: int) -> int:
    """Batch rows to measure with: the job's batch, at most MEASURE_ROWS. The blockwise kernel computes all
    rows of a block in one batched product, a kernel per sequence one sequence per call, so the crossover
    moves with the batch (torch's kernel on the Intel kind, 1 x 1,024: a tie; 4 x 1,024: blockwise 1.3x
    faster)."""
    return max(1, min(batch_size, MEASURE_ROWS))


def measured_once(config, compute, max_len: int, batch_size: int, softmax: str, sequence: str) -> tuple[dict, bool]:
    """(`measure`'s times, whether an earlier job measured them): kept per machine, head shape, dtype,
    lengths, rows, the blockwise kernel's softmax and the kernel per sequence (`sequence`, the one in use),
    so later jobs and every process of a distributed job (local rank 0 measures first) decide alike."""
    from contract.decisions import head_shape
    from contract.machine_cache import kept_or_measured, machine_key

    heads, kv_heads, dim = head_shape(config)
    lengths = measure_lengths(max_len)
    rows = measure_rows(batch_size)
    key = machine_key(f"heads {heads}/{kv_heads} of {dim}", str(compute)[6:], f"softmax {softmax}",
                      f"lengths {','.join(map(str, lengths))}", f"rows {rows}", f"sequence {sequence}")
    kept, earlier = kept_or_measured(CACHE_KIND, key, lambda: {  # JSON keys are strings
        str(n): t for n, t in measure(heads, kv_heads, dim, compute, lengths, rows).items()})
    return {int(n): t for n, t in kept.items()}, earlier


def measure_lengths(max_len: int) -> list[int]:
    """MEASURE_LENGTHS within max_len, and max_len itself when between two of them."""
    lengths = [n for n in MEASURE_LENGTHS if n <= max_len]
    if max_len > MEASURE_LENGTHS[0] and max_len not in lengths and max_len < MEASURE_LENGTHS[-1]:
        lengths.append(max_len)
    return lengths


def measure(heads: int, kv_heads: int, dim: int, compute, lengths: list[int], rows: int = 1, rounds: int = 3) -> dict:
    """Milliseconds for one layer's attention forward and backward on `rows` batch rows of one causal
    sequence of each length, through the kernel per sequence in use (`attention`) and through the
    blockwise kernel (with the softmax it runs with in this process), alternated `rounds` times; the
    fastest round of each."""
    import torch

    from trainer import attention as kernels
    from trainer.native import fastest_ms

    generator = torch.Generator().manual_seed(0)
    timed = {}
    for n in lengths:
        q, k, v, grad = random_inputs(rows, n, heads, kv_heads, dim, compute, generator)
        mask = torch.zeros(n, n, dtype=compute).masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1),
                                                             torch.finfo(compute).min)[None, None].expand(rows, 1, n, n)
        spans = [[(0, n, True)]] * rows
        scale = dim ** -0.5

        def with_segments():
            attention(q, k, v, spans, scale, compute).backward(grad)

        def with_blockwise():
            kernels.blockwise(q, k, v, mask, scale, compute).backward(grad)

        timed[n] = fastest_ms({"segments": with_segments, "blockwise": with_blockwise}, rounds)
    return timed


def random_inputs(rows: int, n: int, heads: int, kv_heads: int, dim: int, dtype, generator):
    """q (rows, heads, n, dim), k and v (rows, kv_heads, n, dim) as transformers hands them over (transposed
    views of (rows, n, heads, dim) projections, requiring grad), and an upstream gradient (rows, n, heads,
    dim): the measurements' inputs."""
    import torch

    def projection(count):
        return torch.randn(rows, n, count, dim, generator=generator, dtype=dtype).transpose(1, 2).requires_grad_()

    q, k, v = projection(heads), projection(kv_heads), projection(kv_heads)
    return q, k, v, torch.randn(rows, n, heads, dim, generator=generator, dtype=dtype)
