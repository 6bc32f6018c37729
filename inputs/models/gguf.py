"""Base models a user already has as GGUF: a local `.gguf` file, or `ollama:NAME[:TAG]` from the Ollama
store ($OLLAMA_MODELS or ~/.ollama/models: manifests/<host>/<namespace>/<name>/<tag> lists layers; the
model layer's digest names its file in blobs/).

Here the file is found and its architecture and tensor types read (the `gguf` package, no torch),
refused by name when transformers cannot load them. Dequantizing it and checking the result against
llama.cpp is trainer/models/gguf_base.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from contract.errors import UserError
from contract.paths import cache_root

OLLAMA_PREFIX = "ollama:"
MODEL_LAYER = "application/vnd.ollama.image.model"
# What transformers' GGUF loader reads (transformers.integrations.ggml) and gguf-py dequantizes.
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "stablelm", "starcoder2",
                 "falcon", "gpt2", "bloom", "nemotron")
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                "Q6_K")
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


def folder_for(path: Path) -> Path:
    """Where the dequantized folder of a GGUF file is cached (one per file content)."""
    return cache_root() / "gguf" / f"{path.stem}-{_fingerprint(path)}"


def cached_folder(model_id: str) -> Path | None:
    target = folder_for(source_file(model_id))
    return target if (target / "model.safetensors").exists() else None
