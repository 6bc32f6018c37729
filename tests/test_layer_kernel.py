"""trainer/layer_kernel.py and trainer/fused_layers.py: a decoder layer's RMSNorm, SwiGLU and rotary
embedding as one C++ pass each. Values and gradients against transformers' own operators (bf16 forward to
the bit, float32 to its rounding), widths that are not whole vectors, every family the registry names
against its own tiny model, hand-over to torch's operators where the kernel does not apply (other
families, dtypes, tracing for torch.compile), and the decision."""

from __future__ import annotations

import pytest
from conftest import broken_compiler

from trainer.fused_layers import FAMILIES


@pytest.fixture(scope="module")
def kernel():
    from trainer import layer_kernel
    from trainer.performance import cpp_compiler

    return layer_kernel.load(cpp_compiler())


def _relative(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _same_in_bf16(ours, theirs) -> bool:
    """Equal but for a few values one bf16 step apart: float32 sums (the norm's mean, the exponential in
    SiLU) taken in another order than torch's can land a value on the other side of a rounding boundary."""
    step = theirs.float().abs() * 2.0 ** -7 + 1e-30
    return (ours.float() - theirs.float()).abs().le(step).all().item() and (ours != theirs).float().mean() < 0.01


def _norm(width, dtype):
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(width).to(dtype)
    norm.weight.data = torch.linspace(0.5, 1.5, width).to(dtype)
    return norm


def _grads(outputs, upstream, *inputs):
    import torch

    return torch.autograd.grad(outputs, inputs, upstream)


@pytest.mark.parametrize("width", [576, 100])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rms_norm_matches_transformers(kernel, dtype, width):
    """The output as transformers' LlamaRMSNorm gives it (bf16 to its last bit: the normalised input rounded
    before the weight's product, as it rounds it), and the gradients of input and weight to the dtype's
    rounding; 100 wide is 6 vectors and a tail of 4."""
    import torch

    from trainer.layer_kernel import rms_norm

    dtype = getattr(torch, dtype)
    norm = _norm(width, dtype)
    torch.manual_seed(0)
    x = (torch.randn(3, 37, width) * 3).to(dtype).requires_grad_()
    upstream = torch.randn(3, 37, width).to(dtype)
    ours, theirs = rms_norm(kernel, x, norm.weight, norm.variance_epsilon), norm(x)
    if dtype == torch.bfloat16:
        assert _same_in_bf16(ours, theirs)
    else:
        assert _relative(ours, theirs) < 1e-6
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for mine, reference in zip(_grads(ours, upstream, x, norm.weight), _grads(theirs, upstream, x, norm.weight)):
        assert mine.dtype == reference.dtype and _relative(mine, reference) < tolerance


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_swiglu_matches_silu_times_up_and_keeps_only_its_inputs(kernel, dtype):
    """silu(gate) * up to bf16's last bit (each product rounded where torch rounds it) and to float32's
    rounding, gates far out in both tails included (silu 0 and the identity, no NaN); the backward
    from gate and up alone (autograd keeps those two, not silu(gate))."""
    import torch

    from trainer.layer_kernel import swiglu

    dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    gate = (torch.randn(5, 333) * 6).to(dtype)
    gate[0, :4] = torch.tensor([-200.0, -90.0, 90.0, 200.0])
    gate.requires_grad_()
    up = torch.randn(5, 333).to(dtype).requires_grad_()
    upstream = torch.randn(5, 333).to(dtype)
    ours, theirs = swiglu(kernel, gate, up), torch.nn.functional.silu(gate) * up
    assert not ours.isnan().any()
    if dtype == torch.bfloat16:
        assert _same_in_bf16(ours, theirs)
    else:
        assert _relative(ours, theirs) < 1e-6
    assert [t.data_ptr() for t in ours.grad_fn.saved_tensors] == [gate.data_ptr(), up.data_ptr()]
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for mine, reference in zip(_grads(ours, upstream, gate, up), _grads(theirs, upstream, gate, up)):
        assert _relative(mine, reference) < tolerance


@pytest.mark.parametrize("dim", [64, 48])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rotary_matches_transformers_in_the_projections_layout(kernel, dtype, dim):
    """q and k as the attention hands them over ((B, heads, L, D) views of (B, L, heads, D) projections):
    the rotated values as transformers' apply_rotary_pos_emb gives them (bf16 to the bit: the same
    products, each rounded, and their sum), in the same memory layout, and
    their gradients; a 48-wide head rotates halves of 24 (a vector and a tail of 8)."""
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from trainer.fused_layers import torch_rotary
    from trainer.layer_kernel import rotary

    dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    q = torch.randn(2, 29, 6, dim).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 29, 2, dim).to(dtype).transpose(1, 2).requires_grad_()
    angles = torch.randn(2, 29, dim // 2) * 10
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    assert torch_rotary(q, k, cos, sin)[0].shape == apply_rotary_pos_emb(q, k, cos, sin)[0].shape
    theirs = torch_rotary(q, k, cos, sin)
    ours = rotary(kernel, q, cos, sin), rotary(kernel, k, cos, sin)
    upstream = [torch.randn_like(t) for t in theirs]
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for mine, reference in zip(ours, theirs):
        assert mine.stride() == reference.stride()
        if dtype == torch.bfloat16:
            assert torch.equal(mine, reference)
        else:
            assert _relative(mine, reference) < 1e-6
    for mine, reference in zip(_grads(ours, upstream, q, k), _grads(theirs, upstream, q, k)):
        assert _relative(mine, reference) < tolerance


def test_the_weight_gradient_does_not_depend_on_the_thread_count(kernel):
    """A trained norm weight's gradient sums each column over the rows in order: the same bits with 1
    thread as with 2 (a distributed job's processes each run fewer threads than one process would)."""
    import torch

    from trainer.layer_kernel import rms_norm

    norm = _norm(260, torch.float32)
    x = torch.randn(999, 260, requires_grad=True, generator=torch.Generator().manual_seed(0))
    upstream = torch.randn(999, 260, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _grads(rms_norm(kernel, x, norm.weight, 1e-6), upstream, x, norm.weight)
    finally:
        torch.set_num_threads(threads)
    for mine, reference in zip(_grads(rms_norm(kernel, x, norm.weight, 1e-6), upstream, x, norm.weight), one):
        assert torch.equal(mine, reference)


def _tiny_model(model_type: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.models.families import FAMILIES as FIXTURES, SHAPE

    extra = FIXTURES[model_type].config if model_type in FIXTURES else {}
    config = AutoConfig.for_model(model_type, vocab_size=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  **{**SHAPE, "num_hidden_layers": 1}, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _nodes(loss) -> set[str]:
    """The names of every autograd node behind loss."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_registered_family_trains_the_same_with_the_kernel(kernel, model_type):
    """Each family's tiny model (its real transformers classes): the loss and every parameter's gradient
    with the kernel as with the model's own operators, and the kernel in the graph for each part the
    registry hands it (norms always; the MLP and the rotary embedding where they are Llama's)."""
    import torch

    from trainer.fused_layers import use_fused_layers

    model = _tiny_model(model_type)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss, {n: p.grad.clone() for n, p in model.named_parameters()}

    reference, reference_grads = loss_and_grads()
    try:
        assert use_fused_layers(model, kernel) > 0
        loss, grads = loss_and_grads()
        nodes = _nodes(loss)
    finally:
        use_fused_layers(model, None)
    layers = FAMILIES[model_type]
    assert "RmsNormBackward" in nodes
    assert ("SwiGluBackward" in nodes) == (layers.mlp is not None)
    assert ("RotaryBackward" in nodes) == (layers.rotary is not None)
    assert abs(loss.item() - reference.item()) < 1e-5 * reference.item()
    for name, grad in grads.items():
        assert _relative(grad, reference_grads[name]) < 1e-4, name
    again, _ = loss_and_grads()  # handed back: the model's own operators
    assert "RmsNormBackward" not in _nodes(again)


def test_other_families_and_inputs_keep_torchs_operators(kernel):
    """Gemma 2 (a (1 + weight) norm) is not handed over; a norm whose weight's dtype differs from its
    input's keeps its own forward; while torch.compile traces a layer the model's own operators are
    traced (one graph, nothing of ours in it)."""
    import torch

    from trainer.fused_layers import use_fused_layers

    assert use_fused_layers(_tiny_model("gemma2"), kernel) == 0
    model = _tiny_model("llama")
    try:
        use_fused_layers(model, kernel)
        norm = model.model.norm
        x = torch.randn(2, 7, 256, dtype=torch.bfloat16, requires_grad=True)
        assert "RmsNormBackward" not in _nodes(norm(x).sum())  # float32 weight, bf16 input
        traced = torch.compile(norm, fullgraph=True, backend="eager")
        y = traced(torch.randn(2, 7, 256, requires_grad=True))
        assert "RmsNormBackward" not in _nodes(y.sum())
    finally:
        use_fused_layers(model, None)


def test_the_decision_is_measured_and_falls_back_without_a_kernel(tmp_path, monkeypatch):
    """On CPU the kernel is timed against torch's operators on the model's widths, once per machine: a
    later job reads the times and decides alike; other devices and unverified families keep torch's
    operators; a compiler that fails is torch's operators with the compiler's last line, no library left
    behind, and a kept "kernel" that cannot be built falls back."""
    from contract.decisions import Decision
    from trainer import native, performance

    monkeypatch.setenv("LLAMAFARM_CACHE", str(tmp_path / "measured"))
    model = _tiny_model("llama")
    decision = performance.choose_layer_kernel(model, "cpu")
    assert decision.value in ("kernel", "torch") and "ms with torch's operators" in decision.reason
    assert "by an earlier job" not in decision.reason
    again = performance.choose_layer_kernel(model, "cpu")
    assert again.value == decision.value and again.reason.endswith("by an earlier job on this machine)" + (
        "; compiled layers fuse them themselves" if decision.value == "kernel" else ""))
    assert performance.choose_layer_kernel(model, "cuda").value == "torch"
    unverified = performance.choose_layer_kernel(_tiny_model("gemma2"), "cpu")
    assert unverified.value == "torch" and "this is gemma2" in unverified.reason
    monkeypatch.setenv("LLAMAFARM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(performance, "cpp_compiler", lambda: str(broken_compiler(tmp_path, "no")))
    decision = performance.choose_layer_kernel(model, "cpu")
    assert decision.value == "torch" and "could not build layer_kernel.cpp (exit 1): no" in decision.reason
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []
    kept = performance.use_layer_kernel(model, Decision("kernel", "measured 2x faster"))
    assert kept.value == "torch" and "was decided (measured 2x faster), but cannot be built here" in kept.reason
