"""trainer/attention.py's kernels for packed CPU batches against transformers' sdpa attention with the
same block-diagonal mask (outputs and q/k/v gradients), the blockwise kernel with torch's softmax and
with ours (trainer/softmax_kernel.py, "blockwise-fused"), and with long sequences through torch's causal
kernel one at a time (trainer/attention_segments.py, "segments") or through our flash kernel
(trainer/flash_kernel.py, "flash"), and the kernels' memory: what they keep for backward grows linearly in
the sequence length. The model-level checks (logits and LoRA gradients of
a packed batch, bf16 autocast) are in tests/test_performance.py."""

from __future__ import annotations

import random

import pytest

KERNELS = ("grouped-matmul", "blockwise", "blockwise-fused", "segments", "flash")
# Head widths per kernel: our flash kernel takes 64 and 128 (trainer/flash_kernel.py HEAD_DIMS).
HEAD_DIM = {"flash": 64}


@pytest.fixture(scope="module", autouse=True)
def softmax_kernel():
    """Our softmax kernel, built with the machine's C++ compiler (CI installs g++); the blockwise kernel
    uses it only inside `_run("blockwise-fused", ...)`."""
    from trainer import attention, softmax_kernel
    from trainer.performance import cpp_compiler

    kernel = softmax_kernel.load(cpp_compiler())
    attention.use_softmax_kernel(None)
    yield kernel
    attention.use_softmax_kernel(None)


def _mask(batch: int, n: int, rows: tuple[int, ...], seed: int = 0):
    """A packed batch's mask as trainer/data/batching.py builds it: each sequence filled with rows of
    lengths drawn from `rows`; all but the first end in a few padding positions (which attend to
    themselves only)."""
    from trainer.data.batching import collate

    rng = random.Random(seed)
    sequences = []
    for i in range(batch):
        seq, room = [], n - (rng.randrange(0, min(5, n)) if i else 0)
        while room:
            length = min(room, rng.choice(rows))
            seq.append(([1] * length, [1] * length))
            room -= length
        sequences.append(seq)
    return collate(sequences, 0, block_mask=True).attention_mask


def _inputs(batch, heads, kv_heads, n, d, dtype, seed=0):
    import torch

    torch.manual_seed(seed)
    q = torch.randn(batch, heads, n, d, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv_heads, n, d, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, kv_heads, n, d, dtype=dtype, requires_grad=True)
    grad = torch.randn(batch, n, heads, d, dtype=dtype)
    return q, k, v, grad


def _run(kernel, q, k, v, mask, grad):
    """Output (B, L, H, D) and the q, k, v gradients of one kernel, called as transformers calls it."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from trainer import attention, attention_segments

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = q.shape[1] // k.shape[1], True
    function = {"sdpa": sdpa_attention_forward, "grouped-matmul": attention.grouped_matmul_attention,
                "blockwise": attention.blockwise_attention, "blockwise-fused": attention.blockwise_attention,
                "segments": attention.blockwise_attention, "flash": attention.blockwise_attention}[kernel]
    torch_attention = attention_segments.torch_attention
    if kernel in ("segments", "flash"):  # every packed batch goes through a kernel per sequence
        attention_segments.use_from(1)
    if kernel == "flash":  # ours, and not torch's behind it
        from trainer import flash_kernel
        from trainer.performance import cpp_compiler

        attention_segments.use_flash_kernel(flash_kernel.load(cpp_compiler()))
        attention_segments.torch_attention = _not_torchs
    if kernel == "blockwise-fused":
        from trainer import softmax_kernel
        from trainer.performance import cpp_compiler

        attention.use_softmax_kernel(softmax_kernel.load(cpp_compiler()))
    try:
        out, _ = function(module, q, k, v, mask.to(q.dtype))
        return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad))
    finally:
        attention.use_softmax_kernel(None)
        attention_segments.use_from(None)
        attention_segments.use_flash_kernel(None)
        attention_segments.torch_attention = torch_attention


def _not_torchs(*args):
    raise AssertionError("torch's kernel ran where our flash kernel should have")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n", [1, 37, 64, 130, 200])
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4), (9, 3)])
def test_kernel_equals_sdpa_in_fp32(kernel, n, heads, kv_heads):
    """Lengths under, at and past one query block, not divisible by it; packed rows of 1-90 tokens."""
    import torch

    q, k, v, grad = _inputs(2, heads, kv_heads, n, HEAD_DIM.get(kernel, 16), torch.float32)
    mask = _mask(2, n, (1, 7, 40, 90))
    ours, theirs = _run(kernel, q, k, v, mask, grad), _run("sdpa", q, k, v, mask, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max()), name


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bf16_matmuls", [True, False])
def test_kernel_in_bf16_is_as_close_to_float64_as_sdpa(monkeypatch, kernel, bf16_matmuls):
    """bf16 inputs: the error against a float64 reference is of sdpa's own bf16 size. The kernels
    compute in bf16 on CPUs with bf16 matmuls, in float32 elsewhere (both are run here)."""
    import torch

    from trainer import attention

    monkeypatch.setattr(attention, "_bf16", bf16_matmuls)
    q, k, v, grad = _inputs(2, 9, 3, 150, 64, torch.bfloat16)
    mask = _mask(2, 150, (20, 64, 100))
    exact = _run("sdpa", *(t.detach().double().requires_grad_() for t in (q, k, v)), mask, grad.double())
    ours, theirs = _run(kernel, q, k, v, mask, grad), _run("sdpa", q, k, v, mask, grad)
    for name, a, b, x in zip(("out", "dq", "dk", "dv"), ours, theirs, exact):
        assert a.dtype == torch.bfloat16
        error, sdpa_error = (a.double() - x).norm() / x.norm(), (b.double() - x).norm() / x.norm()
        assert error <= max(2 * sdpa_error, 4e-3), (name, error.item(), sdpa_error.item())


def test_blockwise_skips_the_keys_no_query_of_a_block_sees():
    """Rows of 64 tokens packed end to end: each 64-query block meets only its own row's keys."""
    import torch

    from trainer import attention

    blocks = attention._blocks(_mask(1, 256, (64,)), 256, torch.float32)
    assert [(q0, q1, k0) for q0, q1, k0, _ in blocks] == [(0, 64, 0), (64, 128, 64), (128, 192, 128),
                                                         (192, 256, 192)]


def _saved_bytes(kernel, n):
    """Bytes the kernel's forward keeps for backward (each storage once), one packed row of n tokens."""
    import torch

    q, k, v, grad = _inputs(1, 6, 2, n, HEAD_DIM.get(kernel, 16), torch.float32)
    mask = _mask(1, n, (n,))
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _run(kernel, q, k, v, mask, grad)
    return sum(saved.values())


def test_blockwise_memory_grows_linearly_in_the_length():
    """4x the length keeps 4x the bytes for backward with the blockwise kernel; the grouped matmuls'
    softmax probabilities grow ~16x (13.6x here: the causal blocks keep 5/8 of L^2 at 4 blocks, 17/32
    at 16)."""
    blockwise = _saved_bytes("blockwise", 1024) / _saved_bytes("blockwise", 256)
    grouped = _saved_bytes("grouped-matmul", 1024) / _saved_bytes("grouped-matmul", 256)
    assert blockwise == pytest.approx(4, rel=0.02)
    assert grouped > 12


def test_blockwise_hands_bmm_contiguous_operands_and_returns_gradients_in_the_projections_order():
    """torch's CPU bmm copies an operand whose matrices are not contiguous (a block's slice of q, k or v
    is not): no bmm of the blockwise kernel copies one, forward or backward. q, k and v come in as
    transformers makes them, transposed views of (B, L, heads, D) projections, and their gradients go
    back in that memory order, so the transposes' backward needs no copy either."""
    import torch

    from trainer import attention

    # bf16: where the CPU has bf16 matmuls it is their (oneDNN) bmm that copies strided batches.
    q, k, v, grad = _inputs(2, 6, 2, 256, 16, torch.bfloat16)
    q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
    mask = _mask(2, 256, (40, 90, 130))
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    with torch.profiler.profile() as profile:
        out, _ = attention.blockwise_attention(module, q, k, v, mask)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    bmms = [e for e in profile.events() if e.name == "aten::bmm"]
    copying = [e for e in bmms if any(c.name in ("aten::contiguous", "aten::clone", "aten::copy_")
                                      for c in e.cpu_children)]
    assert len(bmms) >= 4 * 7  # 4 query blocks of 64: 2 products forward, 5 backward (scores again, dV, dP, dQ, dK)
    assert not copying, f"{len(copying)} of {len(bmms)} bmm calls copied an operand"
    for g in (dq, dk, dv):
        assert g.transpose(1, 2).is_contiguous()


def test_segments_read_the_packed_sequences_off_the_mask():
    """Each packed sequence is a causal span; a one-token row and the padding after it (positions that
    see only themselves, whose output is their value) merge into one span with no kernel call."""
    from trainer import attention_segments
    from trainer.data.batching import collate

    rows = [[([1] * 5, [1] * 5), ([1] * 3, [1] * 3)], [([1] * 4, [1] * 4), ([1], [1])], [([1] * 2, [1] * 2)]]
    spans = attention_segments.spans_of(collate(rows, 0, block_mask=True).attention_mask)
    assert spans == [[(0, 5, True), (5, 8, True)], [(0, 4, True), (4, 8, False)], [(0, 2, True), (2, 8, False)]]
    assert attention_segments.weighted_length(spans) == (25 + 9 + 16 + 4) / (5 + 3 + 4 + 2)


def test_segments_leave_a_mask_that_is_not_block_diagonal_causal_to_the_blockwise_kernel():
    """One key hidden from one query: no longer sequences, so the blockwise kernel takes the batch (and
    honours the hole: the result is sdpa's)."""
    import torch

    from trainer import attention_segments

    q, k, v, grad = _inputs(1, 6, 2, 90, 16, torch.float32)
    mask = _mask(1, 90, (90,)).clone()
    mask[0, 0, 50, 10] = torch.finfo(mask.dtype).min
    assert attention_segments.spans_of(mask) is None
    ours, theirs = _run("segments", q, k, v, mask, grad), _run("sdpa", q, k, v, mask, grad)
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max())


@pytest.mark.parametrize("kernel", ["segments", "flash"])
def test_segments_memory_grows_linearly_in_the_length(kernel):
    assert _saved_bytes(kernel, 1024) / _saved_bytes(kernel, 256) == pytest.approx(4, rel=0.02)


@pytest.mark.parametrize("dim", [128, 80])
def test_flash_kernel_takes_128_wide_heads_and_leaves_others_to_torch(dim):
    """Llama-3 and Qwen heads are 128 wide: the kernel's other instantiation. A width it was not built for
    (80) goes through torch's kernel instead, exactly as well."""
    import torch

    from trainer import attention_segments, flash_kernel
    from trainer.performance import cpp_compiler

    kernel = flash_kernel.load(cpp_compiler())
    q, k, v, grad = _inputs(2, 4, 2, 150, dim, torch.float32)
    assert kernel.takes(q, k, v) == (dim == 128)
    mask = _mask(2, 150, (20, 64, 100))
    if dim == 128:
        ours = _run("flash", q, k, v, mask, grad)  # fails if torch's kernel runs instead
    else:
        attention_segments.use_flash_kernel(kernel)
        try:
            ours = _run("segments", q, k, v, mask, grad)
        finally:
            attention_segments.use_flash_kernel(None)
    theirs = _run("sdpa", q, k, v, mask, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, theirs):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max()), name


def test_flash_kernel_gives_the_same_bits_every_run():
    """Runs are bitwise reproducible at a thread count (the README's guarantee): the threads' shares of dQ
    are summed in an order the thread count alone fixes, not whichever thread finished first. Sequences
    of uneven work per key tile, so threads finish their tasks at different times."""
    import torch

    from trainer import flash_kernel
    from trainer.performance import cpp_compiler

    kernel = flash_kernel.load(cpp_compiler())
    q, k, v, grad = _inputs(1, 9, 3, 700, 64, torch.float32)
    spans = [[(0, 650, True), (650, 700, True)]]
    with _threads(2):
        results = []
        for _ in range(6):
            out = flash_kernel.attention(kernel, q, k, v, spans, 0.125)
            results.append((out.detach(), *torch.autograd.grad(out, (q, k, v), grad)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def _threads(count: int):
    import contextlib

    import torch

    @contextlib.contextmanager
    def kept():
        before = torch.get_num_threads()
        torch.set_num_threads(count)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    return kept()


def test_flash_kernel_reads_and_writes_the_projections_in_place():
    """q, k and v as transformers hands them over (transposed views of (B, L, heads, D) projections) go in
    without a copy, and the output and gradients come back in that memory order."""
    import torch

    from trainer import flash_kernel
    from trainer.performance import cpp_compiler

    kernel = flash_kernel.load(cpp_compiler())
    q, k, v, grad = _inputs(2, 9, 3, 100, 64, torch.float32)
    q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
    spans = [[(0, 60, True), (60, 100, True)], [(0, 97, True), (97, 100, True)]]  # (padding copies its value)
    with torch.profiler.profile() as profile:
        out = flash_kernel.attention(kernel, q, k, v, spans, 0.125)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    assert out.is_contiguous() and all(g.transpose(1, 2).is_contiguous() for g in (dq, dk, dv))
    assert not [e for e in profile.events() if e.name in ("aten::contiguous", "aten::clone")]


@pytest.mark.parametrize("timed,expected", [
    ({512: (10, 8), 1024: (40, 42), 2048: (120, 140)}, 1024),  # faster from 1024 on
    ({512: (10, 11), 1024: (40, 42), 2048: (120, 140)}, 512),  # faster everywhere
    ({512: (10, 11), 1024: (43, 42), 2048: (120, 140)}, 2048),  # not from 512: slower at 1024
    ({512: (10, 11), 1024: (40, 42), 2048: (150, 140)}, None),  # slower at the longest: never
    ({512: (10, 10)}, None),  # a tie is not faster
])
def test_segments_crossover_is_where_the_kernel_per_sequence_wins_from_there_on(timed, expected):
    from trainer import attention_segments

    as_measured = {n: {"segments_ms": s, "blockwise_ms": b} for n, (s, b) in timed.items()}
    assert attention_segments.crossover(as_measured) == expected


@pytest.mark.parametrize("max_len,expected", [
    (100, []), (128, [128]), (300, [128, 256, 300]), (512, [128, 256, 512]), (600, [128, 256, 512, 600]),
    (1024, [128, 256, 512, 768, 1024]), (8192, [128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096])])
def test_segments_are_measured_at_the_jobs_lengths(max_len, expected):
    from trainer import attention_segments

    assert attention_segments.measure_lengths(max_len) == expected


def test_the_segments_decision_measures_both_kernels_once_per_machine(tmp_path, monkeypatch):
    """The crossover is measured at the job's lengths and kept: the second job reads it (and says so)
    and decides alike; where the blockwise kernel is not the job's attention, or the sequences are
    shorter than the shortest measured, nothing is measured."""
    from types import SimpleNamespace

    from trainer import attention_segments, performance

    monkeypatch.setenv("LLAMAFARM_CACHE", str(tmp_path / "cache"))
    config = SimpleNamespace(num_attention_heads=6, num_key_value_heads=2, hidden_size=96)
    first = performance.choose_attention_segments("blockwise", config, "fp32", 512, 8, "aten")
    assert first.value in ("off", "128", "256", "512") and "512 tokens " in first.reason
    assert "on 4 batch rows" in first.reason and "torch's causal kernel" in first.reason
    monkeypatch.setattr(attention_segments, "measure", lambda *a, **k: pytest.fail("measured again"))
    second = performance.choose_attention_segments("blockwise", config, "fp32", 512, 4, "aten")
    assert second.value == first.value and "measured by an earlier job on this machine" in second.reason
    # Another batch size is another measurement: the blockwise kernel batches rows, torch's kernel not.
    measured = []

    def faster_per_sequence(heads, kv_heads, dim, compute, lengths, rows):
        measured.append(rows)
        return {n: {"segments_ms": 1.0, "blockwise_ms": 2.0} for n in lengths}

    monkeypatch.setattr(attention_segments, "measure", faster_per_sequence)
    alone = performance.choose_attention_segments("blockwise", config, "fp32", 1024, 1, "aten")
    assert (alone.value, measured) == ("128", [1]) and "on 1 batch row of" in alone.reason
    # ... and so is another kernel per sequence, named in the reason.
    flash = performance.choose_attention_segments("blockwise", config, "fp32", 1024, 1, "aten", "flash")
    assert (flash.value, measured) == ("128", [1, 1]) and "through our flash kernel" in flash.reason
    assert performance.choose_attention_segments("grouped-matmul", config, "fp32", 256, 1, "aten").value == "off"
    assert performance.choose_attention_segments("blockwise", config, "fp32", 100, 1, "aten").value == "off"
    assert performance.choose_attention_segments("blockwise", config, "fp16", 2048, 1, "aten").value == "off"
    try:
        performance.use_attention_segments(performance.Decision("1024", "kept"))
        assert attention_segments._from_length == 1024
    finally:
        performance.use_attention_segments(performance.Decision("off", "reset"))
    assert attention_segments._from_length is None


def test_the_sequence_kernel_decision_measures_ours_against_torchs_once_per_machine(tmp_path, monkeypatch):
    """Our flash kernel where it measured faster than torch's on one sequence of the job's length (up to
    1,024 tokens), kept per machine: the second job reads it and says so. torch's where ours was not
    faster, where the heads are a width it was not built for, in fp16, without the blockwise attention,
    and where it cannot be built; a kept "flash" hands the segments path the kernel."""
    from types import SimpleNamespace

    from trainer import attention_segments, flash_kernel, performance

    monkeypatch.setenv("LLAMAFARM_CACHE", str(tmp_path / "cache"))
    config = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, hidden_size=256)
    timed = []

    def measure(kernel, heads, kv_heads, dim, dtype, length):
        timed.append((heads, kv_heads, dim, length))
        return {"flash_ms": 1.0, "sdpa_ms": 1.5}

    monkeypatch.setattr(flash_kernel, "measure", measure)
    first = performance.choose_sequence_kernel("blockwise", config, "fp32", 2048)
    assert first.value == "flash" and "1.5x faster than torch's" in first.reason and timed == [(4, 2, 64, 1024)]
    second = performance.choose_sequence_kernel("blockwise", config, "fp32", 2048)
    assert second.value == "flash" and "measured by an earlier job on this machine" in second.reason
    monkeypatch.setattr(flash_kernel, "measure", lambda *a: {"flash_ms": 2.0, "sdpa_ms": 1.5})
    slower = performance.choose_sequence_kernel("blockwise", config, "fp32", 600)  # another length: measured
    assert slower.value == "sdpa" and "600-token sequence" in slower.reason
    wide = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, hidden_size=320)
    assert "not 80" in performance.choose_sequence_kernel("blockwise", wide, "fp32", 1024).reason
    assert performance.choose_sequence_kernel("blockwise", config, "fp16", 1024).value == "sdpa"
    assert performance.choose_sequence_kernel("grouped-matmul", config, "fp32", 256).value == "sdpa"
    monkeypatch.setattr(performance, "cpp_compiler", lambda: None)
    built = performance.choose_sequence_kernel("blockwise", config, "fp32", 1024)
    assert built.value == "sdpa" and "no C++ compiler" in built.reason
    kept = performance.use_sequence_kernel(performance.Decision("flash", "kept"))
    assert kept.value == "sdpa" and "cannot be built here" in kept.reason
    monkeypatch.undo()
    try:
        assert performance.use_sequence_kernel(performance.Decision("flash", "kept")).value == "flash"
        assert attention_segments._flash is not None
    finally:
        performance.use_sequence_kernel(performance.Decision("sdpa", "reset"))
    assert attention_segments._flash is None
