"""Base models a user already has as GGUF: a local `.gguf` file, or `ollama:NAME[:TAG]` from the Ollama
store ($OLLAMA_MODELS or ~/.ollama/models: manifests/<host>/<namespace>/<name>/<tag> lists layers; the
model layer's digest names its file in blobs/).

The file is dequantized once by transformers' GGUF loader into a plain Hugging Face folder in the
machine-wide cache, then checked against llama.cpp on the source file: the rebuilt tokenizer must
tokenize probe text exactly as llama.cpp does, and the next-token choice (top-1) must agree at 99%
of the positions of a probe conversation. A mismatch is an error: training on a model that is not
the one the user has would be worse than not training.

The architecture and the tensor types are read first (no torch) and refused by name when
transformers cannot load them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from contract.errors import UserError
from trainer.models.cache import build_once, file_sha256

OLLAMA_PREFIX = "ollama:"
MODEL_LAYER = "application/vnd.ollama.image.model"
# What transformers' GGUF loader reads (transformers.integrations.ggml) and gguf-py dequantizes.
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "stablelm", "starcoder2",
                 "falcon", "gpt2", "bloom", "nemotron")
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                "Q6_K")
MIN_TOP1_AGREEMENT = 0.99
PROBE_CONVERSATION = [
    {"role": "user", "content": "What are the symptoms of anemia, and how is it usually treated?"},
    {"role": "assistant", "content": "Anemia often causes tiredness, weakness, pale skin and shortness of "
                                     "breath. Treatment depends on the cause: iron supplements are common."},
]


def is_gguf_source(model_id: str) -> bool:
    return model_id.startswith(OLLAMA_PREFIX) or model_id.endswith(".gguf")


def ollama_store() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def _ollama_names(store: Path) -> list[str]:
    root = store / "manifests"
    found = []
    for tag in sorted(p for p in root.glob("*/*/*/*") if p.is_file()):
        host, namespace, name = tag.parts[-4:-1]
        prefix = "" if (host, namespace) == ("registry.ollama.ai", "library") else f"{namespace}/"
        found.append(f"ollama:{prefix}{name}:{tag.name}")
    return found


def ollama_blob(model_id: str) -> Path:
    """The model layer's file of `ollama:NAME[:TAG]` in the Ollama store."""
    store = ollama_store()
    name, _, tag = model_id.removeprefix(OLLAMA_PREFIX).partition(":")
    parts = name.split("/")
    host, namespace = "registry.ollama.ai", "library"
    if len(parts) == 2:
        namespace = parts[0]
    elif len(parts) == 3:
        host, namespace = parts[0], parts[1]
    manifest = store / "manifests" / host / namespace / parts[-1] / (tag or "latest")
    if not manifest.is_file():
        have = ", ".join(_ollama_names(store)) or "none"
        raise UserError(f"{model_id} is not in the Ollama store {store} (set OLLAMA_MODELS to another store, or "
                        f"`ollama pull {name}:{tag or 'latest'}` first); models there: {have}")
    try:
        layers = json.loads(manifest.read_text())["layers"]
        digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == MODEL_LAYER)
    except (ValueError, KeyError, StopIteration, TypeError):
        raise UserError(f"{manifest} is not an Ollama manifest with a model layer ({MODEL_LAYER})") from None
    blob = store / "blobs" / digest.replace(":", "-")
    if not blob.is_file():
        raise UserError(f"{model_id}: its model layer {blob} is missing from the Ollama store")
    return blob


def source_file(model_id: str) -> Path:
    path = ollama_blob(model_id) if model_id.startswith(OLLAMA_PREFIX) else Path(model_id).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"base model file {path} does not exist")
    return path


def inspect(path: Path) -> tuple[str, dict]:
    """(architecture, GGUF metadata as plain values) of a supported file; unsupported ones refused by name."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # not a GGUF at all, or a truncated one
        raise UserError(f"{path} is not a readable GGUF file ({exc})") from None
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "merges", "scores", "token_type")):
            meta[key] = len(field.data)  # only their length is needed here
        elif field.types and field.types[0] != gguf.GGUFValueType.ARRAY:
            meta[key] = field.contents()
    arch = meta.get("general.architecture", "?")
    if arch not in ARCHITECTURES:
        raise UserError(f"{path}: architecture {arch!r} cannot be fine-tuned from GGUF here; supported: "
                        f"{', '.join(ARCHITECTURES)}")
    types = sorted({t.tensor_type.name for t in reader.tensors})
    bad = [t for t in types if t not in TENSOR_TYPES]
    if bad:
        raise UserError(f"{path}: tensor type(s) {', '.join(bad)} cannot be dequantized for training; supported: "
                        f"{', '.join(TENSOR_TYPES)} (re-quantize the model, e.g. to Q8_0, or use its original weights)")
    meta["tensor_types"] = types
    meta["tied_embeddings"] = not any(t.name == "output.weight" for t in reader.tensors)
    return arch, meta


def _fingerprint(path: Path) -> str:
    if path.name.startswith("sha256-"):  # an Ollama blob is named by its content's hash
        return path.name.removeprefix("sha256-")[:12]
    stat = path.stat()
    return hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def cached_folder(model_id: str) -> Path | None:
    from trainer.models.builtin import cache_root

    path = source_file(model_id)
    target = cache_root() / "gguf" / f"{path.stem}-{_fingerprint(path)}"
    return target if (target / "model.safetensors").exists() else None


def dequantized_folder(model_id: str) -> Path:
    """The GGUF base model as a verified Hugging Face folder, built on first use (cached per file)."""
    from trainer.models.builtin import cache_root

    path = source_file(model_id)
    arch, meta = inspect(path)
    target = cache_root() / "gguf" / f"{path.stem}-{_fingerprint(path)}"

    def build(tmp: Path) -> None:
        print(f"base model {model_id}: {arch}, {'/'.join(meta['tensor_types'])}; dequantizing once into {target}",
              flush=True)
        dequantize(path, tmp)
        check = verify_against_llamacpp(path, tmp)
        provenance = {"model": model_id, "file": str(path), "file_sha256": file_sha256(path), "architecture": arch,
                      "how": f"dequantized from {'/'.join(meta['tensor_types'])} to float32 by transformers' GGUF loader",
                      "check": check}
        (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")

    return build_once(target, "model.safetensors", build)


def dequantize(source: Path, out: Path) -> None:
    """A GGUF file to a plain model folder (fp32 safetensors, tokenizer, chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): its weights are already
    # plain fp32 tensors, so they move into an ordinary model of the same class and config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(out)


def verify_against_llamacpp(source: Path, folder: Path) -> dict:
    """Tokenization equal to llama.cpp's on probe text, and top-1 agreement >= 99% on a probe
    conversation; raises UserError otherwise."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.export.llamacpp import llama_cpp_module
    from trainer.export.verify import TOKENIZER_PROBES  # the probes every export is checked with

    llama_cpp = llama_cpp_module("checking a GGUF base model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    probe = (tokenizer.apply_chat_template(PROBE_CONVERSATION, tokenize=False) if tokenizer.chat_template
             else " ".join(m["content"] for m in PROBE_CONVERSATION))
    llm = llama_cpp.Llama(model_path=str(source), n_ctx=512, logits_all=True, verbose=False, seed=0)
    for text in [probe, *TOKENIZER_PROBES]:
        ours = tokenizer(text)["input_ids"]
        theirs = llm.tokenize(text.encode(), add_bos=True, special=True)
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise UserError(f"{source}: the dequantized tokenizer differs from llama.cpp's on {text[:40]!r} from "
                            f"token {at} (ours {ours[at:at + 6]}, llama.cpp {theirs[at:at + 6]}); not trained on")
    ids = tokenizer(probe)["input_ids"]
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float32).argmax(-1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([ids])).logits[0].argmax(-1).numpy()
    agreement = float((ours == theirs).mean())
    if agreement < MIN_TOP1_AGREEMENT:
        raise UserError(f"{source}: the dequantized model picks the same next token as llama.cpp at only "
                        f"{agreement:.1%} of {len(ids)} positions (at least {MIN_TOP1_AGREEMENT:.0%} needed); not trained on")
    print(f"checked against llama.cpp: tokenizer equal on {1 + len(TOKENIZER_PROBES)} probes, "
          f"top-1 agreement {agreement:.1%} over {len(ids)} positions", flush=True)
    return {"tokenizer_probes_equal": 1 + len(TOKENIZER_PROBES), "top1_agreement": round(agreement, 4),
            "positions": len(ids)}
