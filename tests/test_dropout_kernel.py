"""trainer/dropout_kernel.py: LoRA dropout drawn and applied in one C++ pass. Its masks against the
Bernoulli distribution they stand for, their independence of the thread count (reproducible on any
machine), the backward drawing the same mask again (nothing kept), the values against torch's own
scaled product in float32 and bf16, and the build shared with the softmax kernel (trainer/native.py).
FastDropout with the kernel against torch's dropout is in tests/test_performance.py."""

from __future__ import annotations

import pytest
from conftest import broken_compiler


@pytest.fixture(scope="module")
def kernel():
    from trainer import dropout_kernel
    from trainer.performance import cpp_compiler

    return dropout_kernel.load(cpp_compiler())


def _kept(kernel, shape, seed, p):
    import torch

    return kernel.apply(torch.ones(shape), seed, p) != 0


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_masks_are_bernoulli_draws(kernel, p):
    """Over 8M elements (4096 x 2048): the dropped share within 6 standard deviations of p, every column
    and every residue of the index modulo 16 (the kernel's vector lanes) alike, no correlation between
    neighbours, and seeds next to each other unrelated."""
    rows, cols = 4096, 2048
    kept = _kept(kernel, (rows, cols), 99, p).float()
    sd = (p * (1 - p) / kept.numel()) ** 0.5
    assert abs((1 - kept.mean().item()) - p) < 6 * sd
    per_column = 1 - kept.mean(0)
    assert (per_column - p).abs().max().item() < 6 * (p * (1 - p) / rows) ** 0.5
    per_lane = 1 - kept.flatten().view(-1, 16).mean(0)
    assert (per_lane - p).abs().max().item() < 6 * (p * (1 - p) / (kept.numel() / 16)) ** 0.5
    centred = kept.flatten() - kept.mean()
    for lag in (1, 2, 16, cols):
        correlation = (centred[lag:] * centred[:-lag]).mean() / centred.var()
        assert abs(correlation.item()) < 6 / kept.numel() ** 0.5, f"neighbours {lag} apart correlate"
    other = _kept(kernel, (rows, cols), 100, p).float()
    correlation = ((kept - kept.mean()) * (other - other.mean())).mean() / (kept.std() * other.std())
    assert abs(correlation.item()) < 6 / kept.numel() ** 0.5, "seeds 99 and 100 draw related masks"


def test_the_mask_depends_on_the_seed_and_index_only(kernel):
    """The same seed gives the same mask with 1 or 2 threads, and a tensor's first elements the same mask
    as the first elements of a longer one (the vector body and the scalar tail agree)."""
    import torch

    x = torch.randn(333, 77)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel.apply(x, 5, 0.3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(kernel.apply(x, 5, 0.3), one)
    assert not torch.equal(kernel.apply(x, 6, 0.3), one)
    long = kernel.apply(torch.ones(1000), 7, 0.5)
    for n in (1, 15, 17, 91):
        assert torch.equal(kernel.apply(torch.ones(n), 7, 0.5), long[:n])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_values_are_torchs_scaled_product(kernel, dtype):
    """Kept elements are x times torch's 1 / (1 - p) in x's dtype, rounded as torch rounds the product;
    dropped ones are x * 0 (NaN and infinity stay NaN, as in torch's dropout)."""
    import torch

    dtype = getattr(torch, dtype)
    x = (torch.randn(64, 129) * 100).to(dtype)
    x[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    y = kernel.apply(x, 11, 0.4)
    scaled = x * torch.tensor(1 / 0.6, dtype=dtype)
    kept = torch.zeros_like(x, dtype=torch.bool)
    kept[1:] = y[1:] != 0
    assert torch.equal(y[kept], scaled[kept])
    assert torch.equal(y[1:][~kept[1:]], torch.zeros_like(y[1:][~kept[1:]]))
    first = y[0, :3]
    assert all(torch.isnan(v) or v == s for v, s in zip(first, scaled[0, :3]))


def test_the_backward_draws_the_same_mask_and_keeps_none(kernel):
    """The gradient through the kernel's dropout is the upstream gradient times the same scaled mask,
    and autograd keeps no tensor for it (PEFT's dropout keeps one float per element)."""
    import torch

    from trainer.dropout_kernel import dropout

    x = torch.randn(40, 50, requires_grad=True)
    y = dropout(kernel, x, 3, 0.25)
    assert y.grad_fn.saved_tensors == ()
    upstream = torch.randn(40, 50)
    y.backward(upstream)
    assert torch.equal(x.grad, kernel.apply(upstream, 3, 0.25))
    assert torch.equal(x.grad != 0, y.detach() != 0)


def test_the_decision_is_measured_and_falls_back_without_a_kernel(tmp_path, monkeypatch):
    """With a compiler the kernel is timed against numpy's mask; a compiler that fails is numpy's mask,
    the compiler's last line in the reason, and no library left behind."""
    from trainer import native, performance

    decision = performance.choose_lora_dropout("lora", 0.05, "cpu", 64)
    assert decision.value in ("kernel", "fast-mask") and "ms with numpy's mask" in decision.reason
    monkeypatch.setenv("LLAMAFARM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_loaded", {})
    broken = broken_compiler(tmp_path, "no")
    monkeypatch.setattr(performance, "cpp_compiler", lambda: str(broken))
    decision = performance.choose_lora_dropout("lora", 0.05, "cpu", 64)
    assert decision.value == "fast-mask" and "could not build dropout_kernel.cpp (exit 1): no" in decision.reason
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []


def test_the_decision_is_measured_once_per_machine(tmp_path, monkeypatch):
    """The second job reads the first one's times and decides alike, saying so: the kernel and numpy draw
    different masks, and two jobs of one strategy that decided apart on a busy machine trained different
    weights (a reference and a resumed container job, 2026-12-03)."""
    from trainer import dropout_kernel, performance

    monkeypatch.setenv("LLAMAFARM_CACHE", str(tmp_path / "cache"))  # no other test's measurement
    first = performance.choose_lora_dropout("lora", 0.05, "cpu", 64)
    monkeypatch.setattr(dropout_kernel, "measure", lambda *a, **k: pytest.fail("measured again"))
    second = performance.choose_lora_dropout("lora", 0.05, "cpu", 64)
    assert second.value == first.value and "measured by an earlier job on this machine" in second.reason
    monkeypatch.setattr(dropout_kernel, "measure", lambda *a, **k: {"kernel_ms": 2.0, "numpy_ms": 1.0})
    assert performance.choose_lora_dropout("lora", 0.1, "cpu", 64).value == "fast-mask"  # another p: measured
