"""Every supported model family trains through the real entrypoint and exports to GGUF f16, q4_k_m and
an Ollama folder (q8_0), each verified against PyTorch by llama.cpp; the Ollama TEMPLATE gives the
training tokens. The fixtures are the families' real transformers classes at a tiny size
(trainer/models/families.py); docs/EXPORT.md's family table is what this file checks."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from contract.strategy import parse_strategy
from orchestrator.plan import make_plan
from trainer.models.families import FAMILIES

from conftest import DATASETS
from test_export import CONVERSATION, _go_render, _modelfile_template

pytestmark = pytest.mark.slow  # trains, exports or evaluates real jobs

# GGUF architecture and tokenizer kind each family must come out as.
EXPECTED = {
    "qwen2": ("qwen2", "gpt2"),
    "qwen3": ("qwen3", "gpt2"),
    "mistral": ("llama", "llama"),
    "gemma2": ("gemma2", "llama"),
    "phi3": ("phi3", "llama"),
}


def _strategy(folder: Path, method: dict):
    return parse_strategy("t", {"fine_tuner": {"config": {
        "base_model": {"name": folder.name, "huggingface_id": str(folder)},
        "method": method,
        # Enough full fine-tuning steps on the bundled data for answers sharp enough that quantized
        # top-1 agreement means something (measured: 30 steps give 100% on q4_k_m for every family).
        "training_args": {"max_steps": 30, "per_device_train_batch_size": 4, "learning_rate": 3e-3,
                          "lr_scheduler_type": "cosine", "warmup_ratio": 0.05, "max_seq_length": 128,
                          "logging_steps": 10, "seed": 7, "precision": "fp32"},
        "device": "cpu",
    }}})


def train(family: str, root: Path, method: dict) -> Path:
    """Build the family's fixture under `root`, train it in-process, return the job folder."""
    from orchestrator import jobs
    from trainer.entrypoint import run
    from trainer.models.families import build

    base = root / f"tiny-{family}"
    if not base.exists():
        build(family, base)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMAFARM_HOME", str(root / "home"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        strategy = _strategy(base, method)
        folder = jobs.create(family, strategy, Path("t.yaml"), DATASETS / "medical_qa.jsonl", None, {},
                             make_plan(strategy, "local"))
        assert run(folder) == 0, (folder / "train.log").read_text()
    return folder


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def job(request, tmp_path_factory):
    family = request.param
    return family, train(family, tmp_path_factory.mktemp(family), {"type": "full"}) / "final"


def _export(folder: Path, fmt: str, quantization: str, tmp_path: Path) -> dict:
    from trainer.export.run import export

    return export(folder, fmt, quantization, tmp_path / f"{fmt}-{quantization}", None)


@pytest.mark.parametrize("quantization", ["f16", "q4_k_m"])
def test_family_gguf_matches_pytorch(job, quantization, tmp_path):
    family, folder = job
    report = _export(folder, "gguf", quantization, tmp_path)
    v = report["verification"]
    assert v["passed"] and v["tokenization_equal"] and v["stops_like_pytorch"], v["problems"]
    fields = gguf.GGUFReader(Path(report["output"]) / "model.gguf").fields
    arch, tokenizer = EXPECTED[family]
    assert fields["general.architecture"].contents() == arch
    assert fields["tokenizer.ggml.model"].contents() == tokenizer
    if quantization == "f16":
        assert v["relative_logit_diff"] <= 1e-3 and v["greedy_equal"]
    else:
        # Hidden and feed-forward widths are multiples of 256: the file really holds K-quant blocks.
        assert "q4_k" in report["gguf"]["tensor_types"], report["gguf"]["tensor_types"]
        assert v["top1_agreement"] >= 0.95


def test_family_ollama_template_gives_the_training_tokens(job, tmp_path):
    from transformers import AutoTokenizer

    from trainer.data.tokenize import ConversationEncoder, choose_template
    from trainer.export.llamacpp import GgufModel

    family, folder = job
    report = _export(folder, "ollama", "q8_0", tmp_path)
    assert report["verification"]["passed"], report["verification"]["problems"]
    out = Path(report["output"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    template, _ = choose_template("auto", tokenizer)
    assert report["ollama_template"] == FAMILIES[family].template
    encoder = ConversationEncoder(tokenizer, template, 128, False, "truncate")
    rendered = _go_render(_modelfile_template((out / "Modelfile").read_text()), CONVERSATION)
    gg = GgufModel(out / "model.gguf")
    ollama_ids = ([gg.bos] if gg.add_bos else []) + gg.llm.tokenize(rendered.encode(), add_bos=False, special=True)
    assert ollama_ids == encoder.prompt_ids(CONVERSATION)
    assert json.loads((out / "export_report.json").read_text())["verification"]["passed"]
