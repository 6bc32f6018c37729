"""Speed levers of the training step, each decided here once and printed with its reason.

- base weights: frozen weights of LoRA/QLoRA are stored in the compute dtype (bf16/fp16), so autocast
  does not re-cast every weight on every forward and the model takes half the memory; the trainable
  adapter weights stay fp32 (decided in contract/decisions.py, which `estimate` calls too).
- loss: the output layer and cross-entropy in chunks over labelled positions only (the kernel is
  trainer/chunked_loss.py); decided here per model family.
- attention: for training batches on CPU, trainer/attention.py's kernels instead of sdpa's masked kernel
  (grouped matmuls for short sequences, blockwise beyond; unpacked rows under the same block-diagonal
  mask, one sequence per row: contract/decisions.py block_mask), and batches of long packed sequences through
  a causal kernel one sequence at a time (trainer/attention_segments.py), from the length where that
  measured faster on this machine: our C++ flash kernel (trainer/flash_kernel.py) where it measured
  faster than torch's (the sequence_kernel decision), else torch's.
- adapter inputs: under autocast, activations go into LoRA layers without PEFT's cast to fp32.
- compile: torch.compile of each decoder layer (one compiled graph serves them all), when the gain
  measured on this machine (trainer/compile_probe.py) repays the one-time compile within the run.
- LoRA dropout: on CPU the mask is drawn by trainer/lora_dropout.py (numpy's PCG64) instead of
  torch's one-draw-per-element generator (compiled layers draw it inside their fused kernels).
- layer kernel: on CPU, each decoder layer's RMSNorm, SwiGLU and rotary embedding computed by
  trainer/layer_kernel.py in one pass forward and one backward, where measured faster.
- optimizer: torch's fused AdamW kernel (one pass over all parameters) where it runs.
- threads: torch's intra-op threads, one per core this process may use, or one when a short probe
  shows other processes holding the cores.
- heap: on CPU, glibc's malloc keeps freed memory for the next step instead of faulting in fresh
  pages each step, where a probe shows page faults cost (trainer/heap.py).

Packing (dataset.packing) is the other big lever; it is decided in trainer.entrypoint.choose_packing.
docs/PERFORMANCE.md has the measured effect of each.
"""

from __future__ import annotations

import contextlib
import os
import statistics

from contract.errors import UserError
from contract.platform import cpp_compiler
from contract.decisions import CPU_ATTENTION_KERNELS, Decision, chunk_rows
from trainer.chunked_loss import causal_lm

# Model families whose causal-LM head is exactly `lm_head(decoder(...))` with nothing in between
# (no logit soft-capping or scaling); the chunked loss is verified against their own loss.
_PLAIN_HEAD_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def use_attention(model, decision: Decision) -> None:
    """Switch the model to the chosen attention (the inner transformers model under any PEFT wrapper)."""
    if decision.value in CPU_ATTENTION_KERNELS:
        from trainer import attention

        causal_lm(model).set_attn_implementation(attention.register(decision.value))


def choose_attention_softmax(attention: str, config, precision: str, max_len: int, world=None) -> Decision:
    """The blockwise kernel's masked softmax: our C++ kernel (trainer/softmax_kernel.py), built here with
    the C++ compiler, when it measures faster than torch's operators on one of this job's query blocks
    (once per machine, kernel build and block shape; later jobs read it); "aten" (torch's operators)
    otherwise, or when it cannot be built."""
    if attention != "blockwise":
        return Decision("aten", f"the {attention} attention has no softmax kernel of ours")
    if precision == "fp16":
        return Decision("aten", "the softmax kernel computes in bf16 or float32, not fp16")
    import torch

    from trainer import attention as kernels
    from trainer import softmax_kernel

    kernel, why_not = _softmax_kernel()
    if kernel is None:
        return Decision("aten", f"torch's operators: {why_not}")
    dtype = kernels.compute_dtype(torch.bfloat16 if precision == "bf16" else torch.float32)
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    group = config.num_attention_heads // kv
    keys = min(max_len, 1024)
    timed, earlier = _measured_once(world, lambda: softmax_kernel.measured_once(
        kernel, dtype, kv, group, kernels.BLOCKWISE_QUERY_BLOCK, keys))
    seen = (f"one {kernels.BLOCKWISE_QUERY_BLOCK}-query block against {keys} keys in {str(dtype)[6:]}, forward and "
            f"backward: {timed['fused_ns']:.2f} ns per score with the kernel, {timed['aten_ns']:.2f} with torch's "
            f"operators{earlier}")
    if timed["fused_ns"] >= timed["aten_ns"]:
        return Decision("aten", f"torch's operators, measured faster here ({seen})")
    return Decision("fused", f"our C++ kernel ({kernel.compiler}, cached as {kernel.path.name}), measured "
                             f"{timed['aten_ns'] / timed['fused_ns']:.1f}x faster here ({seen})")


def use_attention_softmax(decision: Decision) -> Decision:
    """Hand the blockwise kernel our softmax kernel, or torch's operators; a kept "fused" (a resumed run)
    that cannot be built here falls back to the operators, saying so."""
    from trainer import attention

    return _hand_over(decision, "fused", _softmax_kernel, Decision(
        "aten", "torch's operators (the probabilities can differ from the softmax kernel's in the last bit)"),
        attention.use_softmax_kernel)


def choose_sequence_kernel(attention: str, config, precision: str, max_len: int, world=None) -> Decision:
    """The causal kernel the attention_segments path sends each packed sequence through: our C++ flash
    kernel (trainer/flash_kernel.py), built here with the C++ compiler, when it measures faster than
    torch's on one sequence of the job's length (up to 1,024 tokens; once per machine, local rank 0 first
    in a distributed job); torch's ("sdpa") otherwise, or where it cannot be built."""
    if attention != "blockwise":
        return Decision("sdpa", f"the {attention} attention sends no sequence on its own")
    if precision == "fp16":
        return Decision("sdpa", "torch's kernel: our flash kernel takes bf16 or float32, not fp16")
    from contract.decisions import head_shape
    from trainer import flash_kernel

    heads, kv_heads, dim = head_shape(config)
    if dim not in flash_kernel.HEAD_DIMS:
        return Decision("sdpa", f"torch's kernel: our flash kernel takes heads {flash_kernel.HEAD_DIMS} wide, "
                                f"not {dim}")
    kernel, why_not = _flash_kernel()
    if kernel is None:
        return Decision("sdpa", f"torch's kernel: {why_not}")
    import torch

    from trainer import attention as kernels

    compute = kernels.compute_dtype(torch.bfloat16 if precision == "bf16" else torch.float32)
    timed, earlier = _measured_once(world, lambda: flash_kernel.measured_once(kernel, config, compute, max_len))
    seen = (f"one layer's forward and backward on one {timed['length']}-token sequence in {str(compute)[6:]}: "
            f"{timed['flash_ms']:.1f} ms with ours, {timed['sdpa_ms']:.1f} with torch's{earlier}")
    if timed["flash_ms"] >= timed["sdpa_ms"]:
        return Decision("sdpa", f"torch's kernel, measured as fast or faster here ({seen})")
    return Decision("flash", f"our C++ flash kernel ({kernel.compiler}, cached as {kernel.path.name}), measured "
                             f"{timed['sdpa_ms'] / timed['flash_ms']:.1f}x faster than torch's here ({seen})")


def use_sequence_kernel(decision: Decision) -> Decision:
    """Hand the attention_segments path our flash kernel, or torch's; a kept "flash" (a resumed run) that
    cannot be built here falls back to torch's kernel, saying so."""
    from trainer import attention_segments

    return _hand_over(decision, "flash", _flash_kernel, Decision(
        "sdpa", "torch's kernel (its sums run in another order than the flash kernel's)"),
        attention_segments.use_flash_kernel)


_SEQUENCE_KERNELS = {"flash": "our flash kernel", "sdpa": "torch's causal kernel"}


def choose_attention_segments(attention: str, config, precision: str, max_len: int, batch_size: int, softmax: str,
                              sequence: str = "sdpa", world=None) -> Decision:
    """From which length packed sequences go one at a time through the causal kernel the sequence_kernel
    decision chose (`sequence`) instead of the blockwise kernel (trainer/attention_segments.py): the
    crossover measured on this machine at the job's lengths (once per machine; in a distributed job local
    rank 0 measures first, so every process reads the same numbers); "off" where the blockwise kernel was
    as fast at the longest."""
    from trainer import attention_segments

    if attention != "blockwise":
        return Decision("off", f"the {attention} attention takes every packed sequence itself")
    if precision == "fp16":
        return Decision("off", "the blockwise kernel: a kernel per sequence was not measured in fp16")
    lengths = attention_segments.measure_lengths(max_len)
    if not lengths:
        return Decision("off", f"sequences of at most {max_len} tokens, shorter than the shortest measured "
                               f"({attention_segments.MEASURE_LENGTHS[0]})")
    import torch

    from trainer import attention as kernels

    compute = kernels.compute_dtype(torch.bfloat16 if precision == "bf16" else torch.float32)
    timed, earlier = _measured_once(world, lambda: attention_segments.measured_once(
        config, compute, max_len, batch_size, softmax, sequence))
    rows = attention_segments.measure_rows(batch_size)
    name = _SEQUENCE_KERNELS[sequence]
    seen = (f"one layer's forward and backward on {rows} batch row{'s' if rows > 1 else ''} of one sequence in "
            f"{str(compute)[6:]}, ms with {name} against the blockwise one: " + ", ".join(
                f"{n} tokens {t['segments_ms']:.1f} / {t['blockwise_ms']:.1f}" for n, t in sorted(timed.items()))
            + earlier)
    length = attention_segments.crossover(timed)
    if length is None:
        return Decision("off", f"the blockwise kernel for every batch, measured as fast or faster here at "
                               f"{max(timed)} tokens ({seen})")
    return Decision(str(length), f"batches whose packed sequences average {length} tokens or more (weighted by "
                                 f"length) go through {name} one sequence at a time, measured faster here from "
                                 f"that length on ({seen}); both keep memory linear in the length")


def use_attention_segments(decision: Decision) -> Decision:
    from trainer import attention_segments

    attention_segments.use_from(None if decision.value == "off" else int(decision.value))
    return decision


def _measured_once(world, measured_once) -> tuple[dict, str]:
    """(a kernel's times, a note for the decision's reason): `measured_once()` gives (times, whether an
    earlier job on this machine measured them); in a distributed job local rank 0 calls it first, so
    every process reads the same numbers."""
    with world.local_first() if world is not None else contextlib.nullcontext():
        timed, earlier = measured_once()
    return timed, ", measured by an earlier job on this machine" if earlier else ""


def _flash_kernel():
    """(our flash kernel built with this machine's C++ compiler, None) or (None, why it cannot be)."""
    from trainer import flash_kernel

    return _native_kernel(flash_kernel, "flash kernel")


def _softmax_kernel():
    """(our softmax kernel built with this machine's C++ compiler, None) or (None, why it cannot be)."""
    from trainer import softmax_kernel

    return _native_kernel(softmax_kernel, "softmax kernel")


def _dropout_kernel():
    """(our LoRA dropout kernel built with this machine's C++ compiler, None) or (None, why it cannot be)."""
    from trainer import dropout_kernel

    return _native_kernel(dropout_kernel, "dropout kernel")


def _native_kernel(module, what: str):
    compiler = cpp_compiler()
    if not compiler:
        return None, f"no C++ compiler (g++, clang++ or $CXX) on PATH to build the {what} with"
    try:
        return module.load(compiler), None
    except module.BuildFailed as error:
        return None, str(error)


def _hand_over(decision: Decision, kernel_value: str, build, instead: Decision, install) -> Decision:
    """`install` the kernel a decision of `kernel_value` names (None for any other value): built by
    `build`, or, where a kept decision names a kernel that cannot be built here, `instead` (_kept_kernel)."""
    kernel = None
    if decision.value == kernel_value:
        kernel, decision = _kept_kernel(decision, build, instead)
    install(kernel)
    return decision


def _kept_kernel(decision: Decision, build, instead: Decision):
    """(the kernel, the decision) for a decision whose value names one of our kernels: `build()` gives
    (kernel, None) or (None, why not). Where a decision kept from the run this resumes names a kernel
    that cannot be built here, `instead` with both reasons."""
    kernel, why_not = build()
    if kernel is not None:
        return kernel, decision
    return None, Decision(instead.value, f"{instead.reason}: the kernel was decided ({decision.reason}), but cannot be "
                                         f"built here ({why_not})")


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
                   gradient_checkpointing: bool, measured: dict | None = None) -> Decision:
    """Whether to torch.compile the decoder layers (training_args.torch_compile: auto, true or false):
    "on", "off", or "measure" when auto has no measurement of this machine and step yet and the run is
    long enough to take one (trainer/compile_probe.py; `measured` is the cached one). An explicit true
    that cannot be honoured is refused, like an unsupported precision."""
    from trainer import compile_probe

    if setting is False:
        return Decision("off", "training_args.torch_compile is false")
    if device == "cpu" and not cpp_compiler():
        if setting is True:
            raise UserError("training_args.torch_compile: true needs a C++ compiler (g++, clang++ or $CXX) on PATH "
                            "for torch.compile on CPU, and there is none here; "
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
    if measured:
        return compile_probe.decide(measured, estimated_seconds, compiled_already=False)
    if estimated_seconds < compile_probe.MEASURE_AFTER_SECONDS:
        return Decision("off", f"the run is estimated at {estimated_seconds:,.0f} s, and whether compiling pays is "
                               "not measured on this machine for this step yet: a run estimated over "
                               f"~{compile_probe.MEASURE_AFTER_SECONDS} s measures it once")
    return Decision("measure", f"the run is estimated at {estimated_seconds:,.0f} s, and whether compiling pays is "
                               "not measured on this machine for this step yet: timing eager and compiled steps "
                               "on the first batch")


def choose_lora_dropout(method: str, dropout: float, device: str, width: int, world=None) -> Decision:
    """Who draws the LoRA dropout mask (method.dropout > 0): torch's nn.Dropout, our C++ kernel
    (trainer/dropout_kernel.py) or numpy's generator (trainer/lora_dropout.py), whichever of the two
    measures faster on CPU on an activation `width` wide (the model's hidden size; once per machine,
    kernel build, p and width: later jobs read it and draw the same masks)."""
    if method not in ("lora", "qlora") or not dropout:
        return Decision("none", "no LoRA dropout in this strategy")
    if device != "cpu":
        return Decision("torch", f"torch's dropout: on {device} its mask is drawn in parallel")
    compiled = "; compiled layers draw theirs inside their fused kernels (inductor's generator)"
    numpy_mask = (f"p {dropout}: masks from numpy's PCG64 in 16-bit lanes, seeded from torch's generator (~4x "
                  "faster than torch's one-draw-per-element CPU mask)")
    kernel, why_not = _dropout_kernel()
    if kernel is None:
        return Decision("fast-mask", f"{numpy_mask}; our dropout kernel: {why_not}{compiled}")
    from trainer import dropout_kernel

    timed, earlier = _measured_once(world, lambda: dropout_kernel.measured_once(kernel, dropout, width))
    seen = (f"a {dropout_kernel.MEASURE_ROWS} x {width} activation: {timed['kernel_ms']:.2f} ms with the kernel, "
            f"{timed['numpy_ms']:.2f} ms with numpy's mask{earlier}")
    if timed["kernel_ms"] >= timed["numpy_ms"]:
        return Decision("fast-mask", f"{numpy_mask}, measured faster here than our dropout kernel ({seen}){compiled}")
    return Decision("kernel", f"p {dropout}: our C++ kernel ({kernel.compiler}, cached as {kernel.path.name}) draws "
                              "each mask from SplitMix64 of the element's index, seeded from torch's generator, and "
                              "multiplies in the same pass, keeping no mask for backward; measured "
                              f"{timed['numpy_ms'] / timed['kernel_ms']:.1f}x faster here than numpy's mask ({seen})"
                              f"{compiled}")


def use_lora_dropout(model, decision: Decision) -> Decision:
    """Give the LoRA layers the chosen mask; a kept "kernel" (a resumed run) that cannot be built here
    falls back to numpy's mask, saying so."""
    kernel = None
    if decision.value == "kernel":
        kernel, decision = _kept_kernel(decision, _dropout_kernel, Decision(
            "fast-mask", "numpy's masks (from here on they differ from the ones the dropout kernel would have drawn)"))
    if decision.value in ("kernel", "fast-mask"):
        from trainer.lora_dropout import use_fast_dropout

        use_fast_dropout(model, kernel)
    return decision


def _layer_kernel():
    """(our decoder-layer kernel built with this machine's C++ compiler, None) or (None, why it cannot be)."""
    from trainer import layer_kernel

    return _native_kernel(layer_kernel, "layer kernel")


def choose_layer_kernel(model, device: str, world=None) -> Decision:
    """Who computes the decoder layers' RMSNorm, SwiGLU and rotary embedding: our C++ kernel
    (trainer/layer_kernel.py) where it is measured faster on this CPU than the model's own operators, on
    the model's widths (once per machine: `layer_kernel.measured_once`; in a distributed job local rank 0
    measures first, `world.local_first()`); else torch's operators."""
    from trainer import fused_layers, layer_kernel

    config = causal_lm(model).config
    family = getattr(config, "model_type", "?")
    if device != "cpu":
        return Decision("torch", f"torch's operators: the layer kernel is CPU code, this is {device}")
    if fused_layers.family_layers(config) is None:
        return Decision("torch", f"torch's operators: the layer kernel is verified for {', '.join(fused_layers.FAMILIES)} "
                                 f"models, this is {family}")
    kernel, why_not = _layer_kernel()
    if kernel is None:
        return Decision("torch", f"torch's operators: our layer kernel: {why_not}")
    timed, earlier = _measured_once(world, lambda: layer_kernel.measured_once(kernel, config))
    seen = (f"one layer's at {layer_kernel.MEASURE_ROWS} tokens, forward and backward: {timed['kernel_ms']:.2f} ms with "
            f"the kernel, {timed['torch_ms']:.2f} ms with torch's operators{earlier}")
    if timed["kernel_ms"] >= timed["torch_ms"]:
        return Decision("torch", f"torch's operators, measured faster here than our layer kernel ({seen})")
    return Decision("kernel", f"our C++ kernel ({kernel.compiler}, cached as {kernel.path.name}) computes each norm, "
                              "SwiGLU and rotary embedding in one pass forward and one backward, keeping no silu(gate) "
                              f"for backward; measured {timed['torch_ms'] / timed['kernel_ms']:.1f}x faster here ({seen}); "
                              "compiled layers fuse them themselves")


def use_layer_kernel(model, decision: Decision) -> Decision:
    """Hand the model's norms, MLPs and rotary embedding the kernel; a kept "kernel" (a resumed run) that
    cannot be built here falls back to torch's operators, saying so."""
    from trainer.fused_layers import use_fused_layers

    return _hand_over(decision, "kernel", _layer_kernel, Decision(
        "torch", "torch's operators (values can differ from the layer kernel's in the last bit)"),
        lambda kernel: use_fused_layers(model, kernel))


def choose_optimizer(device: str, distributed_mode: str) -> Decision:
    """AdamW's fused kernel (one multithreaded pass over all parameters) or torch's per-tensor loop.
    Measured on 2 cores for a 135M-parameter full fine-tune: 34 ms against 244 ms per step."""
    if device not in ("cpu", "cuda"):
        return Decision("adamw", f"torch's default AdamW: the fused kernel was not measured on {device}")
    if distributed_mode == "fsdp":
        return Decision("adamw", "torch's default AdamW: the fused kernel was not measured on FSDP's sharded parameters")
    return Decision("adamw-fused", f"AdamW's fused {device} kernel: one pass over all parameters (the same "
                                   "update; the Trainer's default optimizer too)")


def use_compile(model, decision: Decision) -> Decision:
    """Compile each decoder layer in place (state-dict keys unchanged) when the decision is on or
    measure; returns the decision taken ("off" when the model has no list of layers to compile).

    Every layer runs the same code, so torch compiles one graph for all of them, with dynamic
    sequence lengths (packed batches vary in width). Our attention kernels stay eager: their query
    blocks depend on the width. The first layer's input is made to require grad like the others',
    or torch would compile a second graph for it. Evaluation runs eagerly (see `eager`)."""
    if decision.value == "off":
        return decision
    layers = _decoder_layers(model)
    if layers is None:
        return Decision("off", f"{type(causal_lm(model)).__name__} has no list of decoder layers to compile one by one")
    import torch

    from trainer import attention

    inner = causal_lm(model)
    kernel = attention.kernel_of(inner.config._attn_implementation)
    if kernel:
        attention.register(kernel, compiled=True)
    if not inner.get_input_embeddings().weight.requires_grad:
        inner.enable_input_require_grads()  # also harmless in eager, should the compile be undone
    # A compile that fails (a missing header, an unsupported op) falls back to eager with a warning.
    torch._dynamo.config.suppress_errors = True
    for layer in layers:
        layer.compile(dynamic=True)
    return decision


def undo_compile(model) -> None:
    """Eager layers again, after a measurement that found no gain: nn.Module.compile keeps the compiled
    call in `_compiled_call_impl` and calls it while set, so clearing it restores the module's own call."""
    from trainer import attention

    for layer in _decoder_layers(model) or []:
        layer._compiled_call_impl = None
    kernel = attention.kernel_of(causal_lm(model).config._attn_implementation)
    if kernel:
        attention.register(kernel, compiled=False)


def _decoder_layers(model):
    inner = causal_lm(model)
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    return getattr(decoder, "layers", None)


def eager():
    """Context for evaluation: compiled layers run eagerly there (no-grad forwards would otherwise
    compile graphs of their own, at the cost of another compile for a few batches)."""
    import torch

    return torch.compiler.set_stance("force_eager")


def choose_chunked_loss(model) -> Decision:
    """On when the model's head can be replaced by the chunked loss without changing its result."""
    inner = causal_lm(model)
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


# A busy verdict (one thread) must hold in this many probes, this many seconds apart: a single probe
# once caught a passing burst (2026-12-02, one job of a benchmark run: 36 ms with 2 threads against 8
# with 1, where the run's 35 other jobs read 3-6 against 6-9) and trained on one of two cores at half speed.
BUSY_CHECKS = 3
BUSY_RECHECK_SECONDS = 0.5


def choose_threads() -> Decision:
    """Intra-op threads: one per core this process may use, unless those cores are busy (set here).

    Every parallel op waits for all its threads; on a machine where other processes hold the cores,
    a thread that is not scheduled stalls each op for a scheduler time slice (milliseconds, for ops
    that take microseconds), and one thread is several times faster. A short probe of a step-like
    mix of ops with each thread count decides; one thread only when the cores stay busy through
    BUSY_CHECKS probes, since a passing burst would otherwise halve the whole run's speed."""
    import time

    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return Decision(str(torch.get_num_threads()), "OMP_NUM_THREADS is set")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cores == 1:
        torch.set_num_threads(1)
        return Decision("1", "one core available")
    busy = []
    for check in range(BUSY_CHECKS):
        if check:
            time.sleep(BUSY_RECHECK_SECONDS)
        timings = _probe_timings(cores)
        if timings[1] >= 0.9 * timings[cores]:
            torch.set_num_threads(cores)
            return Decision(str(cores), f"one per core this process may use (probe: {1e3 * timings[cores]:.0f} ms "
                                        f"with {cores} threads, {1e3 * timings[1]:.0f} ms with 1)")
        busy.append(f"{1e3 * timings[cores]:.0f} against {1e3 * timings[1]:.0f} ms")
    torch.set_num_threads(1)
    return Decision("1", f"the {cores} cores are busy: a step-like probe took longer with {cores} threads than "
                         f"with 1 in each of {BUSY_CHECKS} checks {BUSY_RECHECK_SECONDS} s apart ({'; '.join(busy)})")


def _probe_timings(cores: int) -> dict[int, float]:
    """Median seconds of the probe with `cores` threads and with 1, interleaved so a burst of load
    hits both counts alike."""
    samples: dict[int, list[float]] = {cores: [], 1: []}
    for n in samples:
        _probe_seconds(n)  # warm-up: the first call starts the thread pool
    for _ in range(5):
        for n in samples:
            samples[n].append(_probe_seconds(n))
    return {n: statistics.median(times) for n, times in samples.items()}


def use_threads(decision: Decision) -> Decision:
    """Run with the decided count: a resumed run's count is the run it resumes (the count changes how
    reductions split, so the result's bits), set before anything computes."""
    import torch

    torch.set_num_threads(int(decision.value))
    return decision


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
