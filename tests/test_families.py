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
    "qwen3_moe": ("qwen3moe", "gpt2"),
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


def _check_experts(reader: gguf.GGUFReader) -> None:
    """The fixture's 4 experts of width 512, top-2: stacked 3-D tensors, the router kept F32, the expert keys."""
    fields = reader.fields
    assert [fields[f"qwen3moe.{k}"].contents() for k in ("expert_count", "expert_used_count",
                                                         "expert_feed_forward_length")] == [4, 2, 512]
    tensors = {t.name: t for t in reader.tensors}
    for proj, shape in (("gate", [256, 512, 4]), ("up", [256, 512, 4]), ("down", [512, 256, 4])):
        assert tensors[f"blk.0.ffn_{proj}_exps.weight"].shape.tolist() == shape  # ggml order: cols, rows, experts
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32


@pytest.mark.parametrize("quantization", ["f16", "q4_k_m"])
def test_family_gguf_matches_pytorch(job, quantization, tmp_path):
    family, folder = job
    report = _export(folder, "gguf", quantization, tmp_path)
    v = report["verification"]
    assert v["passed"] and v["tokenization_equal"] and v["stops_like_pytorch"], v["problems"]
    reader = gguf.GGUFReader(Path(report["output"]) / "model.gguf")
    fields = reader.fields
    arch, tokenizer = EXPECTED[family]
    assert fields["general.architecture"].contents() == arch
    assert fields["tokenizer.ggml.model"].contents() == tokenizer
    if family == "qwen3_moe":
        _check_experts(reader)
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


# What target_modules: auto resolves to (job.json's decision): every linear layer but the output layer;
# Phi-3's fused projections are single layers; a mixture's experts and router are no linear layers.
LORA_TARGETS = {
    "qwen2": "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj",
    "phi3": "down_proj, gate_up_proj, o_proj, qkv_proj",
    "qwen3_moe": "k_proj, o_proj, q_proj, v_proj",
}


@pytest.mark.parametrize("family", sorted(LORA_TARGETS))
def test_family_lora_on_auto_targets_exports_merged_and_as_adapter(family, tmp_path):
    from contract.job_folder import read_job

    folder = train(family, tmp_path, {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "auto"})
    decision = read_job(folder)["decisions"]["target_modules"]
    assert decision["value"] == LORA_TARGETS[family]
    assert ("the router are left out" in decision["reason"]) == (family == "qwen3_moe")
    merged = _export(folder / "final", "gguf", "f32", tmp_path)  # the adapter merged as the GGUF streams
    adapter = _export(folder / "final", "adapter-gguf", None, tmp_path)  # llama.cpp applies it on the base
    for report in (merged, adapter):
        v = report["verification"]
        assert v["passed"] and v["relative_logit_diff"] <= 1e-5 and v["greedy_equal"], v["problems"]


# A tool conversation in the data pipeline's form (inputs/data/tools.py): tools, a call, its result.
TOOLS = [{"type": "function", "function": {"name": "get_dose", "description": "Usual adult dose of a drug",
                                           "parameters": {"type": "object", "properties": {"drug": {"type": "string"}},
                                                          "required": ["drug"]}}}]
TOOL_TURNS = [
    {"role": "user", "content": "How much ibuprofen can I take?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_dose", "arguments": {"drug": "ibuprofen"}}}]},
    {"role": "tool", "content": '{"dose": "200-400 mg every 4-6 hours"}'},
]


@pytest.mark.parametrize("template", ["chatml", "qwen2.5"])
def test_qwen_tool_format_ollama_template_gives_the_training_tokens(template, tmp_path):
    """Qwen's tool format (tools block, <tool_call>, <tool_response>): Go's rendering of the Ollama form,
    tokenized by llama.cpp from a Qwen GGUF, is token for token what training encodes."""
    from transformers import AutoTokenizer

    from contract.chat_templates import get_template
    from trainer.data.tokenize import ConversationEncoder
    from trainer.export import gguf_model
    from trainer.export.llamacpp import GgufModel
    from trainer.export.weights import ModelWeights
    from trainer.models.families import build

    base = build("qwen2", tmp_path / "tiny-qwen2")
    chat = get_template(template)
    gguf_model.convert(ModelWeights(base), base, tmp_path / "m.gguf", "f32", "tiny-qwen2", chat.jinja)
    encoder = ConversationEncoder(AutoTokenizer.from_pretrained(base), chat, 512, False, "truncate")
    gg = GgufModel(tmp_path / "m.gguf")
    for messages in (TOOL_TURNS, [{"role": "system", "content": "Answer from the tool."}, *TOOL_TURNS]):
        rendered = _go_render(chat.ollama_template("", "<|im_end|>"), messages, TOOLS)
        assert "<tools>" in rendered and "<tool_call>" in rendered and "<tool_response>" in rendered
        ids = gg.llm.tokenize(rendered.encode(), add_bos=False, special=True)
        assert ids == encoder.prompt_ids(messages, TOOLS)
