"""trainer/attention.py's kernels for packed CPU batches against transformers' sdpa attention with the
same block-diagonal mask (outputs and q/k/v gradients), the blockwise kernel with torch's softmax and
with ours (trainer/softmax_kernel.py, "blockwise-fused"), and the blockwise kernel's memory: what it keeps
for backward grows linearly in the sequence length. The model-level checks (logits and LoRA gradients of
a packed batch, bf16 autocast) are in tests/test_performance.py."""

from __future__ import annotations

import random

import pytest

KERNELS = ("grouped-matmul", "blockwise", "blockwise-fused")


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
    return collate(sequences, 0, packed=True).attention_mask


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

    from trainer import attention

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = q.shape[1] // k.shape[1], True
    function = {"sdpa": sdpa_attention_forward, "grouped-matmul": attention.grouped_matmul_attention,
                "blockwise": attention.blockwise_attention, "blockwise-fused": attention.blockwise_attention}[kernel]
    if kernel == "blockwise-fused":
        from trainer import softmax_kernel
        from trainer.performance import cpp_compiler

        attention.use_softmax_kernel(softmax_kernel.load(cpp_compiler()))
    try:
        out, _ = function(module, q, k, v, mask.to(q.dtype))
        return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad))
    finally:
        attention.use_softmax_kernel(None)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n", [1, 37, 64, 130, 200])
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4), (9, 3)])
def test_kernel_equals_sdpa_in_fp32(kernel, n, heads, kv_heads):
    """Lengths under, at and past one query block, not divisible by it; packed rows of 1-90 tokens."""
    import torch

    q, k, v, grad = _inputs(2, heads, kv_heads, n, 16, torch.float32)
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

    q, k, v, grad = _inputs(1, 6, 2, n, 16, torch.float32)
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
