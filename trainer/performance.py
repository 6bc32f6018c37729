"""Speed levers of the training step, each decided here once and printed with its reason.

- base weights: frozen weights of LoRA/QLoRA are stored in the compute dtype (bf16/fp16), so autocast
  does not re-cast every weight on every forward and the model takes half the memory; the trainable
  adapter weights stay fp32.
- loss: the output layer and cross-entropy run in chunks of rows, on labelled positions only, with the
  gradient for the hidden states computed chunk by chunk. The full (tokens x vocabulary) logits never
  exist: with a 49k vocabulary they are the largest tensors of a small model's step.
- attention: for packed batches on CPU, trainer/attention.py's batched matmuls instead of sdpa's
  masked kernel, while the probabilities it keeps for backward stay small.
- adapter inputs: under autocast, activations go into LoRA layers without PEFT's cast to fp32.
- compile: torch.compile of each decoder layer (one compiled graph serves them all), when the
  estimated training time repays the one-time compile.
- threads: torch's intra-op threads, one per core this process may use, or one when a short probe
  shows other processes holding the cores.

Packing (dataset.packing) is the other big lever; it is decided in trainer.entrypoint.choose_packing.
docs/PERFORMANCE.md has the measured effect of each.
"""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

from contract.errors import UserError
from contract.decisions import Decision, chunk_rows

# Model families whose causal-LM head is exactly `lm_head(decoder(...))` with nothing in between
# (no logit soft-capping or scaling); the chunked loss is verified against their own loss.
_PLAIN_HEAD_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# The matmul attention keeps (batch x heads x L^2) probabilities per layer; above this, the model's own.
ATTENTION_PROBS_LIMIT_MB = 512
# torch.compile of the decoder layers, measured on bench/'s SmolLM2-135M-shaped LoRA run, 2 cores
# (docs/PERFORMANCE.md): steps ~8% faster, after ~27 s of compiling the first time on a machine (a
# later run of the same model reuses torch's compile cache: ~7 s). Auto compiles when the estimated
# training time times the gain repays the first-time cost.
COMPILE_GAIN = 0.08
COMPILE_SECONDS = 30


def choose_attention(device: str, packed: bool, config, batch_size: int, max_len: int, dtype: str) -> Decision:
    """Attention kernel for training: trainer/attention.py's grouped matmuls for packed CPU batches whose
    softmax probabilities (kept for backward) fit in ATTENTION_PROBS_LIMIT_MB, else the model's own."""
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if device != "cpu" or not packed:
        return Decision(impl, "the model's own (the matmul attention is for packed batches on CPU)")
    if impl not in ("sdpa", "eager"):
        return Decision(impl, "the model's own")
    if getattr(config, "attn_logit_softcapping", None):
        return Decision(impl, "the model's own: the matmul attention has no logit soft-capping (Gemma 2)")
    mb = attention_probs_mb(config, batch_size, max_len, dtype)
    if mb > ATTENTION_PROBS_LIMIT_MB:
        return Decision(impl, f"the model's own: matmul attention would keep {mb:,.0f} MB of probabilities for "
                              f"{max_len}-token sequences (limit {ATTENTION_PROBS_LIMIT_MB} MB)")
    return Decision("grouped-matmul", f"packed sequences of up to {max_len} tokens on CPU: batched matmuls with "
                                      f"query heads grouped per KV head beat sdpa's masked kernel; keeps {mb:,.0f} MB "
                                      "of probabilities for backward")


def use_attention(model, decision: Decision) -> None:
    """Switch the model to the chosen attention (the inner transformers model under any PEFT wrapper)."""
    if decision.value == "grouped-matmul":
        from trainer import attention

        _causal_lm(model).set_attn_implementation(attention.register())


def choose_adapter_inputs(method: str, precision: str) -> Decision:
    """Whether PEFT casts each adapter's input to the adapter's fp32 dtype. Under autocast that cast is
    undone by the adapter's own matmul (it runs in the autocast dtype), so it only costs two copies
    of the activations per adapted layer."""
    if method in ("lora", "qlora") and precision in ("bf16", "fp16"):
        return Decision("as-is", f"{precision} activations go into the adapters uncast (autocast runs their "
                                 f"matmuls in {precision} anyway)")
    return Decision("cast", "PEFT's default")


def adapter_inputs(model, decision: Decision):
    """Context for the training loop that applies choose_adapter_inputs' decision."""
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model, active=decision.value == "as-is")


def choose_compile(setting, device: str, estimated_seconds: float | None, distributed: bool,
                   gradient_checkpointing: bool) -> Decision:
    """Whether to torch.compile the decoder layers (training_args.torch_compile: auto, true or false).
    An explicit true that cannot be honoured is refused, like an unsupported precision."""
    if setting is False:
        return Decision("off", "training_args.torch_compile is false")
    if device == "cpu" and not _cpp_compiler():
        if setting is True:
            raise UserError("training_args.torch_compile: true needs a C++ compiler (g++, clang++ or $CXX) on PATH "
                            "for torch.compile on CPU, and there is none here (the CPU container image has none); "
                            "install one, or set torch_compile to auto or false")
        return Decision("off", "no C++ compiler (g++, clang++ or $CXX) on PATH, which torch.compile needs on CPU")
    if setting is True:
        return Decision("on", "training_args.torch_compile is true")
    if device != "cpu":
        return Decision("off", f"auto compiles on CPU only, where it was measured; set torch_compile: true to try "
                               f"it on {device}")
    if distributed or gradient_checkpointing:
        what = "distributed training" if distributed else "gradient checkpointing"
        return Decision("off", f"auto does not compile with {what} (not measured together); "
                               "set torch_compile: true to try it")
    if estimated_seconds is None:
        return Decision("off", "no time estimate for this run to weigh the compile against")
    payback = COMPILE_SECONDS / COMPILE_GAIN
    if estimated_seconds < payback:
        return Decision("off", f"the run is estimated at {estimated_seconds:,.0f} s; ~{100 * COMPILE_GAIN:.0f}% "
                               f"faster steps repay the ~{COMPILE_SECONDS} s compile only after ~{payback:,.0f} s")
    return Decision("on", f"the run is estimated at {estimated_seconds:,.0f} s: ~{100 * COMPILE_GAIN:.0f}% faster "
                          f"steps repay the ~{COMPILE_SECONDS} s compile after ~{payback:,.0f} s")


def _cpp_compiler() -> str | None:
    names = [os.environ["CXX"]] if os.environ.get("CXX") else []
    return next((found for name in names + ["g++", "clang++", "c++"] if (found := shutil.which(name))), None)


def use_compile(model, decision: Decision) -> Decision:
    """Compile each decoder layer in place (state-dict keys unchanged); returns the decision taken.

    Every layer runs the same code, so torch compiles one graph for all of them, with dynamic
    sequence lengths (packed batches vary in width). The matmul attention stays eager: its query
    blocks depend on the width. The first layer's input is made to require grad like the others',
    or torch would compile a second graph for it. Evaluation runs eagerly (see `eager`)."""
    if decision.value != "on":
        return decision
    inner = _causal_lm(model)
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        return Decision("off", f"{type(inner).__name__} has no list of decoder layers to compile one by one")
    import torch

    from trainer import attention

    if inner.config._attn_implementation == attention.NAME:
        attention.register(compiled=True)
    if not inner.get_input_embeddings().weight.requires_grad:
        inner.enable_input_require_grads()
    # A compile that fails (a missing header, an unsupported op) falls back to eager with a warning.
    torch._dynamo.config.suppress_errors = True
    for layer in layers:
        layer.compile(dynamic=True)
    return decision


def eager():
    """Context for evaluation: compiled layers run eagerly there (no-grad forwards would otherwise
    compile graphs of their own, at the cost of another compile for a few batches)."""
    import torch

    return torch.compiler.set_stance("force_eager")


def attention_probs_mb(config, batch_size: int, max_len: int, dtype: str) -> float:
    """Memory of the softmax probabilities the matmul attention keeps for backward, over all layers."""
    size = 4 if dtype == "fp32" else 2
    return config.num_hidden_layers * batch_size * config.num_attention_heads * max_len**2 * size / 2**20


def choose_chunked_loss(model) -> Decision:
    """On when the model's head can be replaced by the chunked loss without changing its result."""
    inner = _causal_lm(model)
    family = getattr(inner.config, "model_type", "?")
    head = inner.get_output_embeddings()
    if family not in _PLAIN_HEAD_FAMILIES:
        return Decision("off", f"verified only for {', '.join(_PLAIN_HEAD_FAMILIES)} models, this is {family}")
    import torch

    if type(head) is not torch.nn.Linear or head.bias is not None:
        return Decision("off", "the output layer is not a plain linear layer (e.g. it carries an adapter)")
    vocab = head.weight.shape[0]
    return Decision("on", f"output layer and cross-entropy in chunks of {chunk_rows(vocab)} rows over labelled "
                          f"positions only; the full logits (tokens x {vocab}) are never built")


def choose_threads() -> Decision:
    """Intra-op threads: one per core this process may use, unless those cores are busy.

    Every parallel op waits for all its threads; on a machine where other processes hold the cores,
    a thread that is not scheduled stalls each op for a scheduler time slice (milliseconds, for ops
    that take microseconds), and one thread is several times faster. A short probe of a step-like
    mix of ops with each thread count decides."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return Decision(str(torch.get_num_threads()), "OMP_NUM_THREADS is set")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cores == 1:
        torch.set_num_threads(1)
        return Decision("1", "one core available")
    samples: dict[int, list[float]] = {cores: [], 1: []}
    for n in samples:
        _probe_seconds(n)  # warm-up: the first call starts the thread pool
    for _ in range(5):  # interleaved, so a burst of load hits both counts alike
        for n in samples:
            samples[n].append(_probe_seconds(n))
    timings = {n: sorted(times)[len(times) // 2] for n, times in samples.items()}
    if timings[1] < 0.9 * timings[cores]:
        torch.set_num_threads(1)
        return Decision("1", f"the {cores} cores are busy: a step-like probe took {1e3 * timings[cores]:.0f} ms "
                             f"with {cores} threads, {1e3 * timings[1]:.0f} ms with 1")
    torch.set_num_threads(cores)
    return Decision(str(cores), f"one per core this process may use (probe: {1e3 * timings[cores]:.0f} ms with "
                                f"{cores} threads, {1e3 * timings[1]:.0f} ms with 1)")


def _probe_seconds(threads: int) -> float:
    """Time of a small matmul plus the elementwise ops that surround it in a transformer layer."""
    import time

    import torch

    torch.set_num_threads(threads)
    x, w = torch.randn(512, 576), torch.randn(576, 576)
    start = time.perf_counter()
    y = x @ w
    for _ in range(8):
        y = torch.nn.functional.silu(y) * y + x
    return time.perf_counter() - start


def _causal_lm(model):
    """The transformers *ForCausalLM under any PEFT wrapper (LoRA layers live inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def forward_loss(model, input_ids, attention_mask, position_ids, labels):
    """The model's causal-LM loss (mean over labelled next-token positions) via the chunked head.

    Returns an object with `.loss`, like a transformers model output."""
    inner = _causal_lm(model)
    hidden = inner.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    return SimpleNamespace(loss=linear_cross_entropy(hidden[:, :-1][keep], inner.get_output_embeddings().weight,
                                                     targets[keep]))


def linear_cross_entropy(hidden, weight, targets):
    """mean(cross_entropy(hidden @ weight.T, targets)), computed chunk by chunk.

    Under autocast the products run in the autocast dtype (as nn.Linear would); the softmax and the
    loss are always float32."""
    import torch

    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif weight.dtype != hidden.dtype:
        hidden = hidden.to(weight.dtype)
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows(weight.shape[0]))


def _make_function():
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        """Forward computes the loss and, when a gradient will be needed, the gradients too, one chunk
        at a time, so only a chunk's logits are ever in memory; backward only scales them."""

        @staticmethod
        def forward(ctx, hidden, weight, targets, chunk):
            n = hidden.shape[0]
            grad_h = torch.zeros_like(hidden) if hidden.requires_grad else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, n, chunk):
                h, y = hidden[start : start + chunk], targets[start : start + chunk]
                logits = h @ weight.t()
                rows = torch.arange(len(y), device=y.device)
                if logits.dtype == torch.float32 or (grad_h is None and grad_w is None):
                    # One fused log-softmax pass in float32 (logsumexp would allocate two more
                    # chunk-sized temporaries); evaluation always takes this exact path.
                    log_probs = torch.log_softmax(logits.float(), dim=-1)
                    total -= log_probs[rows, y].sum()
                    if grad_h is None and grad_w is None:
                        continue
                    probs = log_probs.exp_()
                else:
                    # bf16/fp16 logits: one softmax pass that accumulates in float32 and rounds once to
                    # the compute dtype, which the gradient below is cast to anyway; no float32 copy of
                    # the logits (~4x faster on CPU). The logged loss comes from the rounded
                    # probability of each target (<= 0.4% relative error each, unbiased); clamped at
                    # the dtype's smallest normal so it stays finite.
                    probs = torch.softmax(logits, dim=-1)
                    tiny = torch.finfo(probs.dtype).tiny
                    total -= probs[rows, y].float().clamp_min(tiny).log().sum()
                # d(loss)/d(logits) = softmax - one_hot(target)
                probs[rows, y] -= 1
                d_logits = probs.to(weight.dtype)
                if grad_h is not None:
                    grad_h[start : start + chunk] = d_logits @ weight
                if grad_w is not None:
                    grad_w += (d_logits.t() @ h).float()
            count = max(n, 1)
            ctx.count = count
            ctx.weight_dtype = weight.dtype
            ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
            ctx.has = (grad_h is not None, grad_w is not None)
            return total / count

        @staticmethod
        def backward(ctx, grad_out):
            saved = list(ctx.saved_tensors)
            scale = grad_out / ctx.count  # a 0-d tensor: the product keeps each gradient's dtype
            grad_h = saved.pop(0) * scale if ctx.has[0] else None
            grad_w = (saved.pop(0) * scale).to(ctx.weight_dtype) if ctx.has[1] else None
            return grad_h, grad_w, None, None

    return LinearCrossEntropy


class _Lazy:
    """Builds the autograd Function on first use, so importing this module imports no torch."""

    _fn = None

    def apply(self, *args):
        if _Lazy._fn is None:
            _Lazy._fn = _make_function()
        return _Lazy._fn.apply(*args)


_LinearCrossEntropy = _Lazy()
