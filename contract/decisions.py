"""Decisions made without torch: each returns the value with the reason that gets printed and recorded.

The host (`start`, `estimate`) and the trainer share these functions, so a choice is made by one rule.
What can only be known inside the training process (a GPU's bf16 support, the attention kernel a
loaded model takes) stays in trainer/.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from contract.errors import UserError
from contract.machine_cache import unkept_note

PRECISIONS = ("fp32", "fp16", "bf16")  # what a run computes in; a strategy may also say auto


@dataclass(frozen=True)
class Decision:
    value: object
    reason: str

    def to_json(self) -> dict:
        return {"value": self.value, "reason": self.reason}

    @classmethod
    def from_json(cls, data: dict) -> "Decision":
        return cls(data["value"], data["reason"])


def choose_device(requested: str, fallback: str | None, available: dict[str, bool]) -> Decision:
    """`available` maps cuda, mps and cpu to whether this machine has them (the host asks the OS,
    the trainer asks torch)."""
    if requested == "auto":
        for name in ("cuda", "mps"):
            if available[name]:
                return Decision(name, f"{name} is available; auto picks cuda, then mps, then cpu")
        return Decision("cpu", "no CUDA and no MPS device found; auto picks cuda, then mps, then cpu")
    if available[requested]:
        return Decision(requested, "set in the strategy")
    if fallback:
        return Decision(fallback, f"{requested} was asked for but is not available; strategy falls back to {fallback}")
    raise UserError(
        f"device {requested!r} is not available on this machine; set fine_tuner.config.device to auto or cpu, "
        "or set fallback_device: cpu"
    )


def choose_method(method, device: str) -> Decision:
    """QLoRA needs CUDA and bitsandbytes; elsewhere fall back to LoRA only when the strategy allows."""
    if method.type != "qlora":
        return Decision(method.type, "set in the strategy")
    missing = []
    if device != "cuda":
        missing.append(f"a CUDA device (training on {device})")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package")
    if not missing:
        return Decision("qlora", "CUDA and bitsandbytes are present")
    if method.fallback_to_lora:
        return Decision("lora", f"qlora needs {' and '.join(missing)}; method.fallback_to_lora is on, so plain LoRA")
    raise UserError(
        f"method qlora needs {' and '.join(missing)}; use method.type: lora, "
        "or set method.fallback_to_lora: true to train LoRA instead"
    )


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU has bf16 matmul instructions (without them bf16 is emulated, many
    times slower). Whether bf16 is the faster precision is measured, not read from this."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16"))


def choose_cpu_precision(requested: str, rates: dict | None = None) -> Decision:
    """Training precision on a CPU (a GPU's is the trainer's to decide: it asks the device). auto takes
    the dtype that ran the model's own matmul faster on this machine (`rates`: contract/precision_probe.py)."""
    if requested == "fp16":
        raise UserError("precision fp16 is not supported for CPU training; use bf16, fp32 or auto")
    if requested != "auto":
        return Decision(requested, "set in the strategy")
    fp32, bf16 = rates["fp32"], rates["bf16"]
    measured = (f"measured on this CPU on the model's {rates['shape']} matmul: bf16 {bf16:,.1f} GFLOP/s, "
                f"fp32 {fp32:,.1f} GFLOP/s")
    note = unkept_note(rates.get("contention"))
    if bf16 > fp32:
        return Decision("bf16", f"{measured}; bf16 autocast over fp32 weights{note}")
    return Decision("fp32", f"{measured}{note}")


def choose_base_dtype(method: str, precision: str) -> Decision:
    """The dtype the base model is loaded in."""
    if method == "full":
        return Decision("fp32", "full fine-tuning trains every weight, so all stay fp32")
    if precision in ("bf16", "fp16"):
        return Decision(precision, f"frozen base weights stored in the {precision} compute dtype (half the memory, "
                                   "no re-cast per step); LoRA weights stay fp32")
    return Decision("fp32", "fp32 compute")


def choose_distributed(spec, device: str) -> Decision | None:
    """How the processes of a distributed job meet: None for a single process; else the mode and the
    communication backend (nccl needs CUDA; gloo runs anywhere)."""
    if spec.mode == "none":
        return None
    if spec.backend == "auto":
        backend, why = ("nccl", "auto; CUDA") if device == "cuda" else ("gloo", f"auto; {device}")
    elif spec.backend == "nccl" and device != "cuda":
        raise UserError(f"distributed.backend nccl needs CUDA but training runs on {device}; use backend gloo or auto")
    else:
        backend, why = spec.backend, "set in the strategy"
    machines = f"{spec.nnodes} machine{'s' if spec.nnodes > 1 else ''}"
    return Decision({"mode": spec.mode, "backend": backend},
                    f"{spec.nproc_per_node * spec.nnodes} processes ({machines} x {spec.nproc_per_node}), "
                    f"backend {backend} ({why})")


# Rows of logits per chunk of the trainer's chunked loss: bounds a chunk's float32 logits to ~64 MB
# whatever the vocabulary; `estimate` counts the same chunk.
_CHUNK_ELEMENTS = 16 * 1024 * 1024


def chunk_rows(vocab: int) -> int:
    return max(16, _CHUNK_ELEMENTS // vocab)


def head_shape(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) of a transformers config, with its defaults."""
    heads = config.num_attention_heads
    return (heads, getattr(config, "num_key_value_heads", None) or heads,
            getattr(config, "head_dim", None) or config.hidden_size // heads)


def attention_values(kernel: str, config, max_len: int) -> float:
    """Values one layer's attention keeps per token for backward, by kernel (choose_attention's values or
    the model's own): sdpa's CPU kernel with a mask q, k and v at every query head (grouped KV heads
    repeated) and its output (counted per autograd node on the SmolLM2-135M shape); the grouped matmuls
    q, k and v and the softmax probabilities of the keys each query block meets (about half of max_len
    per query head); the blockwise kernel q, k and v only, so its memory grows linearly in the length."""
    heads, kv_heads, head_dim = head_shape(config)
    qkv = (heads + 2 * kv_heads) * head_dim
    if kernel == "blockwise":
        return qkv
    if kernel == "grouped-matmul":
        blocks = max(1, max_len // 64)  # trainer/attention.py QUERY_BLOCK
        return qkv + heads * max_len * (blocks + 1) / (2 * blocks)
    return 4 * heads * head_dim


def attention_mb(kernel: str, config, batch_size: int, max_len: int, dtype: str) -> float:
    """What attention_values comes to over all layers for a batch of max_len-token sequences."""
    size = 4 if dtype == "fp32" else 2
    values = attention_values(kernel, config, max_len) * batch_size * max_len * config.num_hidden_layers
    return values * size / 2**20


# Up to this max_seq_length the grouped matmuls, which keep the softmax probabilities for backward, run
# ~20% faster than the blockwise kernel, which recomputes them (sequences filled by one row; the two tie on
# packed rows of 64-256 tokens); from 512 tokens the blockwise kernel is as fast or, skipping the keys of
# other packed rows, up to 8x faster (bench/attention.py, docs/PERFORMANCE.md).
GROUPED_MATMUL_MAX_LEN = 256


# The values of choose_attention that are our CPU kernels (trainer/attention.py), not the model's own.
CPU_ATTENTION_KERNELS = ("grouped-matmul", "blockwise")


def choose_attention(device: str, config, batch_size: int, max_len: int, dtype: str) -> Decision:
    """Attention kernel for CPU training batches (trainer/attention.py): the grouped matmuls for sequences
    of up to GROUPED_MATMUL_MAX_LEN tokens, the blockwise kernel beyond; else the model's own. Packed or
    not: unpacked rows carry the same block-diagonal mask, one sequence per row (`block_mask`)."""
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if device != "cpu":
        return Decision(impl, "the model's own (our attention kernels are for CPU)")
    if impl not in ("sdpa", "eager"):
        return Decision(impl, "the model's own")
    if getattr(config, "attn_logit_softcapping", None):
        return Decision(impl, "the model's own: our attention kernels have no logit soft-capping (Gemma 2)")
    kernel = "grouped-matmul" if max_len <= GROUPED_MATMUL_MAX_LEN else "blockwise"
    mb = attention_mb(kernel, config, batch_size, max_len, dtype)
    if kernel == "grouped-matmul":
        return Decision(kernel, f"training sequences of up to {max_len} tokens on CPU, at most {GROUPED_MATMUL_MAX_LEN}: "
                                "batched matmuls with query heads grouped per KV head, faster there than the "
                                f"blockwise kernel; keeps q, k, v and the softmax probabilities for backward "
                                f"({mb:,.0f} MB)")
    return Decision(kernel, f"training sequences of up to {max_len} tokens on CPU, over {GROUPED_MATMUL_MAX_LEN}: "
                            "queries in blocks, each against the keys of its own sequence only; keeps only q, k "
                            f"and v for backward ({mb:,.0f} MB, linear in the length)")


def block_mask(packed: bool, attention: str) -> bool:
    """Whether training batches carry a 4-D block-diagonal causal mask (each sequence a block, padding
    positions seeing only themselves) instead of a (rows, length) padding mask: packed batches need it,
    and our CPU attention kernels take only it, so unpacked rows get it too there (one sequence per row;
    a real position sees the same keys under either mask, so the loss is the same)."""
    return packed or attention in CPU_ATTENTION_KERNELS
