"""trainer/softmax_kernel.py: the blockwise attention's masked softmax in C++ against torch's operators,
its build (cached, atomic, refused cleanly), and the attention_softmax decision. The attention kernel
with it, against sdpa, is in tests/test_attention.py ("blockwise-fused")."""

from __future__ import annotations

import pytest
from conftest import broken_compiler


@pytest.fixture(scope="module")
def kernel():
    from trainer import softmax_kernel
    from trainer.performance import cpp_compiler

    return softmax_kernel.load(cpp_compiler())


def _block(dtype, batch, kv, rows, group, keys, seed=0):
    """Scores of one query block and its mask, sliced out of a wider batch mask as trainer/attention.py
    slices it (rows strided by the full length): a causal diagonal and, for each batch, a first third of
    keys no query sees (another packed row)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    scores = (torch.randn(batch * kv, rows * group, keys, generator=generator) * 4).to(dtype)
    full = torch.zeros(batch, rows + 3, keys + 5, dtype=dtype)
    full[:, :, : keys // 3] = torch.finfo(dtype).min
    for r in range(rows):
        full[:, r, keys - rows + r + 1:] = torch.finfo(dtype).min
    mask = full[:, :rows, :keys][:, None, :, None, :]
    return scores, mask


def _torch_softmax(scores, mask, batch, kv, rows, group):
    import torch

    x = scores.clone()
    x.view(batch, kv, rows, group, -1).add_(mask)
    return torch.softmax(x, dim=-1)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
@pytest.mark.parametrize("batch,kv,rows,group,keys", [(1, 3, 64, 3, 1024), (2, 2, 5, 2, 37), (1, 1, 3, 1, 7),
                                                      (3, 3, 64, 3, 130)])
def test_kernel_gives_torchs_softmax_and_recomputes_it_from_the_log_sum_exp(kernel, dtype_name, batch, kv, rows,
                                                                            group, keys):
    """Rows shorter than one vector, with tails, and strided masks: every probability within one rounding
    step of torch's (bf16: at most 2^-7 relative; a few dozen of 590k differ) or 1e-5 relative (float32:
    the polynomial's own ~3e-6), masked keys exactly 0; the backward's exp(scores + mask - lse) the same."""
    import torch

    dtype = getattr(torch, dtype_name)
    scores, mask = _block(dtype, batch, kv, rows, group, keys)
    expected = _torch_softmax(scores, mask, batch, kv, rows, group).float()
    probabilities = scores.clone()
    lse = kernel.softmax_(probabilities, mask, kv, group)
    recomputed = scores.clone()
    kernel.exp_(recomputed, mask, lse, kv, group)
    step = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-5
    for got in (probabilities, recomputed):
        assert got.dtype == dtype
        assert ((got.float() - expected).abs() <= step * expected).all()
        assert torch.equal(got == 0, expected == 0)
    exact = torch.logsumexp(scores.float().view(batch, kv, rows, group, keys) + mask.float(), dim=-1)
    assert torch.allclose(lse, exact.flatten(), rtol=1e-6, atol=1e-5)


def test_kernel_refuses_a_layout_it_was_not_written_for(kernel):
    import torch

    scores, mask = _block(torch.float32, 1, 2, 4, 2, 16)
    with pytest.raises(ValueError, match="layout"):
        kernel.softmax_(scores.transpose(1, 2).contiguous().transpose(1, 2), mask, 2, 2)
    with pytest.raises(ValueError, match="layout"):
        kernel.softmax_(scores, mask.to(torch.bfloat16), 2, 2)


def test_blockwise_attention_with_the_kernel_runs_no_torch_softmax(kernel):
    """The kernel takes the softmax forward and its recompute backward; torch's softmax backward stays."""
    import torch

    from trainer import attention
    from tests.test_attention import _inputs, _mask

    q, k, v, grad = _inputs(1, 6, 2, 200, 16, torch.bfloat16)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    attention.use_softmax_kernel(kernel)
    try:
        with torch.profiler.profile() as profile:
            out, _ = attention.blockwise_attention(module, q, k, v, _mask(1, 200, (30, 90)).to(torch.bfloat16))
            torch.autograd.grad(out, (q, k, v), grad)
    finally:
        attention.use_softmax_kernel(None)
    names = {e.name for e in profile.events()}
    assert "aten::_softmax" not in names and "aten::_softmax_backward_data" in names


def test_blockwise_attention_with_the_kernel_takes_a_mask_in_any_memory_layout(kernel):
    """A mask whose keys are not contiguous (here: stored transposed) gives what the contiguous one gives."""
    import torch

    from trainer import attention
    from tests.test_attention import _inputs, _mask

    q, k, v, grad = _inputs(2, 6, 2, 150, 16, torch.float32)
    mask = _mask(2, 150, (30, 90))
    transposed = mask.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert transposed.stride(-1) != 1 and torch.equal(transposed, mask)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    attention.use_softmax_kernel(kernel)
    try:
        outs = [attention.blockwise_attention(module, q, k, v, m)[0] for m in (mask, transposed)]
    finally:
        attention.use_softmax_kernel(None)
    assert torch.equal(outs[0], outs[1])


def test_the_build_is_cached_and_a_failed_one_leaves_nothing(tmp_path, monkeypatch):
    """A compiler that fails: BuildFailed with its last line, no library (whole or partial) left; so
    does a cache folder that cannot be made. A working compiler builds once; a second load (the
    loaded-library memo cleared, as in a new process) finds the cached library."""
    from trainer import native, softmax_kernel
    from trainer.performance import cpp_compiler

    monkeypatch.setenv("LLAMAFARM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_loaded", {})
    broken = broken_compiler(tmp_path, "fatal error: the compiler is broken")
    with pytest.raises(softmax_kernel.BuildFailed, match="the compiler is broken"):
        softmax_kernel.load(str(broken))
    kernels = tmp_path / "cache" / "kernels"
    assert list(kernels.iterdir()) == []
    # A cache that cannot be written (here: a file where its folder should be) is a refusal too.
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("LLAMAFARM_CACHE", str(tmp_path / "not-a-folder" / "cache"))
    with pytest.raises(softmax_kernel.BuildFailed, match="failed: .*Not a directory"):
        softmax_kernel.load(cpp_compiler())
    monkeypatch.setenv("LLAMAFARM_CACHE", str(tmp_path / "cache"))
    built = softmax_kernel.load(cpp_compiler())
    assert [p.name for p in kernels.iterdir()] == [built.path.name]
    modified = built.path.stat().st_mtime_ns
    monkeypatch.setattr(native, "_loaded", {})
    assert softmax_kernel.load(cpp_compiler()).path.stat().st_mtime_ns == modified


def _config(heads=9, kv_heads=3):
    from types import SimpleNamespace

    return SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads)


def test_the_decision_measures_the_kernel_against_torchs_operators():
    from trainer.performance import choose_attention_softmax

    decision = choose_attention_softmax("blockwise", _config(), "bf16", 512)
    assert decision.value in ("fused", "aten")
    assert "ns per score with the kernel" in decision.reason and "against 512 keys" in decision.reason


def test_the_decision_keeps_torchs_operators_where_the_kernel_cannot_be_built(tmp_path, monkeypatch):
    from trainer import native, performance

    assert performance.choose_attention_softmax("grouped-matmul", _config(), "bf16", 256).value == "aten"
    assert performance.choose_attention_softmax("blockwise", _config(), "fp16", 512).value == "aten"
    monkeypatch.setattr(performance, "cpp_compiler", lambda: None)
    decision = performance.choose_attention_softmax("blockwise", _config(), "bf16", 512)
    assert decision.value == "aten" and "no C++ compiler" in decision.reason
    # A resumed run that kept "fused" on a machine that cannot build it: torch's operators, said so.
    kept = performance.use_attention_softmax(performance.Decision("fused", "kept"))
    assert kept.value == "aten" and "cannot be built here" in kept.reason
    monkeypatch.setenv("LLAMAFARM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_loaded", {})
    broken = broken_compiler(tmp_path, "no")
    monkeypatch.setattr(performance, "cpp_compiler", lambda: str(broken))
    decision = performance.choose_attention_softmax("blockwise", _config(), "bf16", 512)
    assert decision.value == "aten" and "could not build softmax_kernel.cpp (exit 1): no" in decision.reason


def test_the_decision_is_measured_once_per_machine(tmp_path, monkeypatch):
    """The second job reads the first one's times and decides alike, saying so (the kernel and torch's
    operators round differently); another block shape is measured."""
    from trainer import performance, softmax_kernel

    monkeypatch.setenv("LLAMAFARM_CACHE", str(tmp_path / "cache"))  # no other test's measurement
    first = performance.choose_attention_softmax("blockwise", _config(), "bf16", 512)
    monkeypatch.setattr(softmax_kernel, "measure", lambda *a, **k: pytest.fail("measured again"))
    second = performance.choose_attention_softmax("blockwise", _config(), "bf16", 512)
    assert second.value == first.value and "measured by an earlier job on this machine" in second.reason
    monkeypatch.setattr(softmax_kernel, "measure", lambda *a, **k: {"fused_ns": 2.0, "aten_ns": 1.0})
    assert performance.choose_attention_softmax("blockwise", _config(), "bf16", 1024).value == "aten"
