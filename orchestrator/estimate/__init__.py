"""Predict a run's peak memory, time and disk before it starts, without torch or any download.

Memory (bytes): frozen weights at their stored width, 12 bytes per trainable parameter (fp32 weight, two
AdamW moments) and 4 for its gradient where that exceeds the activations it replaces, activations kept for
the backward pass per token and layer, the loss chunk's logits and their gradient, the framework's fixed
overhead, and on a CPU the share of the activations' memory the C allocator keeps after freeing them.
Time: tokens times FLOPs per token (2 per matmul weight forward, as much again backward for activation
gradients, and again for weight gradients when the weights train), divided by this machine's measured matmul rate at the efficiency training reaches, plus a per-step
cost. Distributed jobs (strategy `distributed`): memory is per process, with FSDP's weights and their
training state split across all processes; on a CPU the processes of one machine share its memory;
a step takes micro-batches from every process, and GPUs add compute while CPU processes share cores.
The constants were measured on CPU runs here (README, "Estimate before, measure after"); `job.json` records every run's
measured peak and time beside this estimate, so the error is visible after each run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from contract.strategy import Strategy
from orchestrator.estimate.shapes import ModelShape, shape_for
from orchestrator.estimate.throughput import busy_note, device_memory_gb, matmul_gflops, precision_rates
from contract.decisions import chunk_rows
from contract.platform import cpp_compiler

MB = 1024 * 1024
# Host memory of a Python process with torch, transformers and peft loaded and a job running.
CPU_OVERHEAD_MB = 430
# ... and what bf16 autocast adds to it on a CPU (oneDNN's bf16 kernels and their buffers): measured
# here as the difference of two tiny LoRA runs, fp32 487 MB and bf16 752 MB peak RSS.
CPU_BF16_RUNTIME_MB = 265
# ... and a full fine-tune's more: its weight gradients and (under autocast, trainer/attention.py) its
# attention run as bf16 matmuls too, and oneDNN keeps kernels per matmul shape, so packed batches of many
# widths grow its cache (a bf16 bmm at 65 widths: +96 MB RSS, fp32 +22). Measured 2026-12-01 on a Zen CPU
# with AVX512-BF16, peak RSS over the estimate without this term: tiny full 30 steps +95 MB, tiny_demo 60
# steps +258 MB, SmolLM2 full 4 steps +459 MB; it grows with the widths a run meets, up to the cache's
# 1,024 kernels.
CPU_BF16_FULL_KERNELS_MB = 200
CUDA_CONTEXT_MB = 600
# Values a Llama layer keeps per token for backward (counted per autograd node on the real SmolLM2-135M
# shape with the trainer's forward, 2026-12-01; the sum matched the 30-layer runs within 0.1%), in units of
# the hidden and intermediate sizes. Always: both norms' inputs, the MLP's gate, SiLU and up outputs; and what
# the attention keeps, which depends on its kernel (contract/decisions.py attention_values; with sdpa, its
# query, key and value at every query head and its output: 4 x hidden).
ACT_COMMON_HIDDEN, ACT_COMMON_INTER = 2, 3
# When the layer's own weights train (full): the inputs of the q/k/v, gate/up and down projections (o_proj's is
# the attention output, already kept) and both norms' normalised inputs.
ACT_DENSE_HIDDEN, ACT_DENSE_INTER = 4, 1
# With our CPU layer kernel (trainer/layer_kernel.py): SwiGLU keeps no SiLU output (its backward recomputes
# it from the gate), and a norm whose weight trains recomputes its normalised input from the input kept.
ACT_COMMON_INTER_KERNEL, ACT_DENSE_HIDDEN_KERNEL = 2, 2
# A LoRA adapter with dropout keeps its dropped input and the dropout mask (a float tensor on CPU): twice its
# input size; without dropout it keeps the input itself, which adapters on the same input share. Our CPU dropout
# kernel (trainer/dropout_kernel.py, built wherever a C++ compiler is: the CPU image ships one) draws the mask
# again in backward instead of keeping it: once.
ACT_DROPOUT_COPIES = 2
ACT_DROPOUT_COPIES_KERNEL = 1
# On a CPU the C allocator (glibc malloc) keeps freed activations in its heaps instead of returning them, and
# batches of other lengths fragment them, so peak RSS grows over the first steps by this share of the
# activations (real SmolLM2-135M LoRA, 512 tokens: 3,221 MB peak with MALLOC_MMAP_THRESHOLD_ fixed, so nothing
# kept, against 4,644 MB by default after 6 steps and 5,157 MB after 42: 0.70 and 0.93 of its 2,035 MB of
# activations; measured 2026-12-01).
CPU_ALLOCATOR_KEPT = 0.55
# Share of the matmul peak a training step reaches, and the fixed cost per step and per layer
# (fitted to tests/test_estimate.py's three CPU runs on an idle 2-core machine, the rate probed as the
# best of short windows: 3.9 s for 30 steps of the 4-layer tiny LoRA, 24.1 s for 6 steps of the 30-layer
# SmolLM2 shape; the earlier 0.8 had been fitted to a rate probed while the machine was busy).
EFFICIENCY = 0.6
STEP_SECONDS, LAYER_STEP_SECONDS = 0.01, 0.007
# Without a dataset: the assumption the estimate states.
ASSUMED_ROWS, ASSUMED_FILL = 1000, 0.5


@dataclass
class Estimate:
    model: str
    shape_source: str
    params: int
    trainable_params: int
    device: str
    memory_mb: dict[str, float] = field(default_factory=dict)
    peak_memory_mb: float = 0.0
    activations_mb_with_checkpointing: float = 0.0
    activations_mb_without_checkpointing: float = 0.0
    available_memory_mb: float | None = None
    tokens_per_epoch: int = 0
    tokens_source: str = ""
    train_tokens: int = 0
    steps: int = 0
    flops_per_token: float = 0.0
    device_gflops: float = 0.0
    seconds: float = 0.0
    eval_seconds: float = 0.0
    """The part of `seconds` spent in evaluation passes (eager: torch.compile does not speed it up)."""
    disk_mb: dict[str, float] = field(default_factory=dict)
    fits: bool | None = True
    """None: the device is not on this machine, so its memory is unknown."""
    advice: list[str] = field(default_factory=list)
    busy: str | None = None
    """Set when other programs are using this machine's cores now: the time will be longer."""

    def to_dict(self) -> dict:
        return asdict(self)


def _trainable(shape: ModelShape, strategy: Strategy) -> int:
    method = strategy.cfg.method
    if method.type == "full":
        return shape.params
    shapes = shape.linear_shapes()
    targets = shapes if method.target_modules == "auto" else method.target_modules
    return shape.num_layers * sum(method.r * (a + b) for name, (a, b) in shapes.items() if name in targets)


def compute_precision(device: str, requested: str, shape: ModelShape) -> str:
    """The precision the trainer will pick (trainer/devices.py): on a CPU, auto from the same measured
    rates on the model's shape; a GPU is taken at its best."""
    from contract.decisions import choose_cpu_precision

    if requested != "auto":
        return requested
    if device == "cpu":
        return choose_cpu_precision(requested, precision_rates(shape.hidden_size, shape.intermediate_size)).value
    return "bf16" if device == "cuda" else "fp32"


def _weight_bytes(method: str, precision: str) -> float:
    from contract.decisions import choose_base_dtype

    if method == "qlora":
        return 0.56  # nf4 with double-quantized constants; embeddings stay in the compute dtype (below)
    # The trainer's own decision: frozen base weights in the compute dtype, full fine-tuning in fp32.
    return 2.0 if choose_base_dtype(method, precision).value in ("bf16", "fp16") else 4.0


def memory(shape: ModelShape, strategy: Strategy, device: str, gradient_checkpointing: bool | None = None,
           cpu_kernels: bool | None = None) -> dict:
    """Peak memory in MB by part. `cpu_kernels`: whether our CPU kernels (LoRA dropout, decoder layers) will
    run (None: on a CPU wherever a C++ compiler is on PATH, as the trainer decides where it has one)."""
    cfg = strategy.cfg
    args = cfg.training_args
    ckpt = args.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    trainable = _trainable(shape, strategy)
    method = cfg.method.type
    precision = compute_precision(device, args.precision, shape)
    act_bytes = 2 if precision in ("bf16", "fp16") else 4
    frozen = 0 if method == "full" else shape.params
    weight_b = _weight_bytes(method, precision)
    weights = frozen * weight_b
    if method == "qlora":  # embeddings and the output head are not quantized
        emb = shape.vocab_size * shape.hidden_size * (1 if shape.tied_embeddings else 2)
        weights += emb * (2.0 - weight_b)
    tokens = args.per_device_train_batch_size * args.max_seq_length
    preference = cfg.method.stage != "sft"
    if preference:  # each item is two rows (chosen and rejected, or a KTO answer and its mismatched twin)
        tokens *= 2
    if cpu_kernels is None:
        cpu_kernels = device == "cpu" and cpp_compiler() is not None
    per_token_layer = _activation_values(shape, strategy, device, precision, cpu_kernels) * act_bytes
    if ckpt:  # only each layer's input is kept, plus one layer recomputed at a time
        activations = tokens * (shape.num_layers * shape.hidden_size * act_bytes + per_token_layer)
    else:
        activations = tokens * shape.num_layers * per_token_layer
    # The trainer's chunked loss (trainer/performance.py, on for the Llama-family shapes estimated here,
    # off under distributed) holds one chunk of rows: fp32 logits, log-softmax and their gradient, or
    # with bf16/fp16 logits the logits and the softmax in that dtype.
    # Preference stages' log-probabilities take the same chunks (trainer/chunked_loss.py answer_log_probs):
    # their backward holds a chunk's float32 logits, softmax and gradient.
    chunked = cfg.distributed.mode == "none"
    rows = min(tokens, chunk_rows(shape.vocab_size)) if chunked else tokens
    logits = rows * shape.vocab_size * (2 * 2 if chunked and act_bytes == 2 and not preference else 4 * 3)
    if chunked and method == "full":  # the output layer trains: the chunked loss sums its gradient in float32
        logits += shape.vocab_size * shape.hidden_size * 4
    overhead = (CUDA_CONTEXT_MB if device == "cuda" else CPU_OVERHEAD_MB) * MB
    if device == "cpu" and precision == "bf16":
        overhead += (CPU_BF16_RUNTIME_MB + (CPU_BF16_FULL_KERNELS_MB if method == "full" else 0)) * MB
    # fp32 weight and two AdamW moments; the gradient (4 more bytes) lives from backward to the optimizer step,
    # when the activations are being freed (the loop sets gradients to None after each step), so the peak is the
    # larger of the two: gradients add only what exceeds the activations and the loss chunk.
    state, grads = trainable * 12, trainable * 4
    if cfg.distributed.mode == "fsdp":  # sharded across every process (one layer is gathered at a time)
        weights, state, grads = weights / _world_size(strategy), state / _world_size(strategy), grads / _world_size(strategy)
    parts = {"weights": weights, "trainable_state": state + max(0.0, grads - activations - logits),
             "activations": activations, "logits": logits, "framework": overhead}
    if device == "cpu":
        parts["allocator_kept"] = activations * CPU_ALLOCATOR_KEPT
    if method == "full" and cfg.method.stage in ("dpo", "kto"):  # the frozen fp32 copy (trainer/entrypoint.py)
        parts["reference_model"] = shape.params * 4
    return {k: round(v / MB, 1) for k, v in parts.items()}


def _activation_values(shape: ModelShape, strategy: Strategy, device: str, precision: str,
                       cpu_kernels: bool) -> float:
    """Values one decoder layer keeps per token for backward (see the ACT_ constants)."""
    from types import SimpleNamespace

    from contract.decisions import attention_values, choose_attention

    cfg, args = strategy.cfg, strategy.cfg.training_args
    h, i = shape.hidden_size, shape.intermediate_size
    values = ACT_COMMON_HIDDEN * h + (ACT_COMMON_INTER_KERNEL if cpu_kernels else ACT_COMMON_INTER) * i
    if cfg.method.type == "full":
        values += (ACT_DENSE_HIDDEN_KERNEL if cpu_kernels else ACT_DENSE_HIDDEN) * h + ACT_DENSE_INTER * i
    else:
        shapes = shape.linear_shapes()
        targets = [n for n in shapes if cfg.method.target_modules == "auto" or n in cfg.method.target_modules]
        if cfg.method.dropout > 0:
            copies = ACT_DROPOUT_COPIES_KERNEL if cpu_kernels else ACT_DROPOUT_COPIES
            values += copies * sum(shapes[n][0] for n in targets)
        else:  # q/k/v share the first norm's output, gate/up the second's; o_proj's input is the attention output
            groups = [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("down_proj",)]
            values += sum(shapes[g[0]][0] for g in groups if any(n in targets for n in g))
        values += cfg.method.r * len(targets)
    # What the attention kernel the trainer will choose keeps (the same decision: contract/decisions.py).
    config = SimpleNamespace(num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
                             num_key_value_heads=shape.num_kv_heads, hidden_size=h, _attn_implementation="sdpa")
    attention = choose_attention(device, config, args.per_device_train_batch_size, args.max_seq_length,
                                 precision)
    return values + attention_values(attention.value, config, args.max_seq_length)


def _eval_passes(strategy: Strategy, steps: int, per_epoch: int) -> int:
    """How often the loop evaluates (trainer/loop.py): every eval_steps, else at each epoch's end, and at the end."""
    if not strategy.cfg.dataset.has_eval:
        return 0
    every = strategy.cfg.training_args.eval_steps or per_epoch
    return steps // every + (1 if steps % every else 0)


def _eval_tokens(strategy: Strategy, dataset: Path | None, tokens_per_epoch: int) -> int:
    d = strategy.cfg.dataset
    if d.eval_file:
        path = Path(d.eval_file).expanduser()  # as `start` reads it: relative to the current folder
        return _token_count(strategy, path).total if path.is_file() else 0
    return int(tokens_per_epoch * d.eval_fraction) if d.eval_fraction else 0


def _world_size(strategy: Strategy) -> int:
    dist = strategy.cfg.distributed
    return 1 if dist.mode == "none" else dist.nproc_per_node * dist.nnodes


def _token_count(strategy: Strategy, dataset: Path | None, conversations=None):
    from orchestrator.estimate.tokens import TokenCount, count_tokens

    if dataset is None:
        row = int(strategy.cfg.training_args.max_seq_length * ASSUMED_FILL)
        return TokenCount([row] * ASSUMED_ROWS, 0, f"assumed: {ASSUMED_ROWS} rows of {int(100 * ASSUMED_FILL)}% of "
                                                   "max_seq_length (pass --dataset)")
    return count_tokens(dataset, strategy, conversations)


def _sequences(strategy: Strategy, count) -> tuple[int, int]:
    """(sequences per epoch, positions computed per epoch, padding included), as trainer/loop.py forms them.

    Packed rows fill sequences to about 95% and batches pad to almost nothing. Unpacked, each row is a
    sequence and a shuffled batch pads to its longest row: per row, the expected longest of a batch
    drawn from these lengths."""
    args = strategy.cfg.training_args
    limit, batch = args.max_seq_length, args.per_device_train_batch_size
    if strategy.cfg.dataset.packing is not False:
        return max(1, math.ceil(count.total / (limit * 0.95))), count.total
    blocks = math.ceil(count.joined / limit)
    if not count.rows:
        return max(1, blocks), count.total
    lengths, n = sorted(count.rows), len(count.rows)
    # E[max of `batch` draws] = sum over the sorted lengths of l_i * P(the largest draw is the i-th).
    longest = sum(length * ((i / n) ** batch - ((i - 1) / n) ** batch) for i, length in enumerate(lengths, 1))
    return n + blocks, round(n * longest) + blocks * limit


def estimate(strategy: Strategy, dataset: Path | None = None, device: str = "cpu", conversations=None) -> Estimate:
    """`conversations`: the dataset's rows when the caller has read them already."""
    cfg, args = strategy.cfg, strategy.cfg.training_args
    shape, source = shape_for(cfg.base_model)
    trainable = _trainable(shape, strategy)
    est = Estimate(cfg.base_model.huggingface_id, source, shape.params, trainable, device)
    est.memory_mb = memory(shape, strategy, device)
    est.peak_memory_mb = round(sum(est.memory_mb.values()), 1)
    if device != "cuda" and cfg.distributed.mode != "none":  # one machine's processes share its memory
        est.peak_memory_mb = round(est.peak_memory_mb * cfg.distributed.nproc_per_node, 1)
    est.activations_mb_with_checkpointing = memory(shape, strategy, device, gradient_checkpointing=True)["activations"]
    est.activations_mb_without_checkpointing = memory(shape, strategy, device, gradient_checkpointing=False)["activations"]
    count = _token_count(strategy, dataset, conversations)
    est.tokens_per_epoch, est.tokens_source = count.total, count.source
    sequences, positions = _sequences(strategy, count)
    world = _world_size(strategy)
    per_epoch = math.ceil(math.ceil(sequences / args.per_device_train_batch_size)
                          / (args.gradient_accumulation_steps * world))
    est.steps = args.max_steps or math.ceil(per_epoch * args.num_train_epochs)
    est.train_tokens = int(est.steps * est.tokens_per_epoch / per_epoch)

    forward = 2 * shape.matmul_params + 4 * args.max_seq_length * shape.hidden_size * shape.num_layers
    # Backward: gradients for activations always, for weights only when they train; checkpointing
    # runs the forward pass twice.
    backward = 2 if cfg.method.type == "full" else 1
    est.flops_per_token = forward * (1 + backward + (1 if args.gradient_checkpointing else 0))
    est.device_gflops = matmul_gflops(device, "bf16" if compute_precision(device, args.precision, shape) == "bf16" else "fp32")
    est.busy = busy_note(device)
    computed = est.train_tokens * positions / max(est.tokens_per_epoch, 1)  # padding is computed too
    compute = computed * est.flops_per_token / (est.device_gflops * 1e9 * EFFICIENCY)
    compute /= world if device == "cuda" else (cfg.distributed.nnodes if cfg.distributed.mode != "none" else 1)
    # Evaluation passes run inside the training time: a forward pass over the eval rows each (the real
    # smollm2_medical test case's final pass over its 30 held-out questions is about a third of its time).
    passes = _eval_passes(strategy, est.steps, per_epoch)
    if passes:
        evaluation = passes * _eval_tokens(strategy, dataset, est.tokens_per_epoch) * forward
        est.eval_seconds = round(evaluation / (est.device_gflops * 1e9 * EFFICIENCY), 1)
    est.seconds = round(compute + est.eval_seconds + est.steps * (STEP_SECONDS + LAYER_STEP_SECONDS * shape.num_layers), 1)

    weights_mb = (trainable if cfg.method.type != "full" else shape.params) * 4 / MB
    checkpoint_mb = weights_mb + trainable * 8 / MB  # weights plus AdamW moments
    kept = min(args.save_total_limit, math.ceil(est.steps / args.save_steps)) if args.save_steps else 0
    est.disk_mb = {"checkpoints": round(kept * checkpoint_mb, 1), "final": round(weights_mb, 1),
                   "best": round(weights_mb, 1) if args.save_best else 0.0,
                   "merged_export_f16": round(shape.params * 2 / MB, 1)}

    available = device_memory_gb(device)
    est.available_memory_mb = round(available * 1024, 1) if available else None
    if available is None:
        est.fits = None  # no such device here to judge against
    elif est.peak_memory_mb > available * 1024:
        est.fits = False
        est.advice = _advice(shape, strategy, device)
    return est


def _advice(shape: ModelShape, strategy: Strategy, device: str) -> list[str]:
    args, method = strategy.cfg.training_args, strategy.cfg.method
    tips = []
    if not args.gradient_checkpointing:
        with_ckpt = sum(memory(shape, strategy, device, gradient_checkpointing=True).values())
        tips.append(f"set training_args.gradient_checkpointing: true (peak about {with_ckpt:,.0f} MB, ~25% slower)")
    if args.per_device_train_batch_size > 1:
        tips.append("lower training_args.per_device_train_batch_size and raise gradient_accumulation_steps to match")
    if args.max_seq_length > 512:
        tips.append("lower training_args.max_seq_length")
    if method.type == "full":
        tips.append("use method.type: lora (trains a fraction of the parameters)")
    elif method.type == "lora" and device == "cuda":
        tips.append("use method.type: qlora (4-bit base weights)")
    tips.append(f"or a smaller base model: this one needs {shape.params / 1e9:.2f}B parameters' weights in memory")
    return tips
