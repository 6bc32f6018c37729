"""Export: every format from fine-tuned jobs on both builtin tokenizers, each GGUF checked against
PyTorch by llama.cpp; the Ollama TEMPLATE rendered by Go's text/template gives the training tokens."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from contract.chat_templates import TEMPLATES
from contract.errors import UserError

pytestmark = pytest.mark.slow  # trains, exports or evaluates real jobs

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "demos" / "datasets" / "medical_qa.jsonl"
GO_RENDERER = ROOT / "tests" / "ollama_template"

# Full fine-tuning long enough that answers are sharp: quantized top-1 checks mean nothing on the flat
# distributions of a barely trained model. A 1M-parameter model learns little through LoRA (README,
# tiny_demo), so the LoRA jobs are short and serve the adapter, merge-on-the-fly and merged paths.
STRATEGIES = """
full_{kind}:
  fine_tuner:
    type: pytorch
    config:
      base_model: {{name: tiny-llama-{kind}, huggingface_id: "builtin:tiny-llama-{kind}"}}
      method: {{type: full}}
      training_args: {{max_steps: 500, per_device_train_batch_size: 4, learning_rate: 3e-3, lr_scheduler_type: cosine,
                      warmup_ratio: 0.05, max_seq_length: 256, logging_steps: 50, seed: 7}}
      device: cpu
lora_{kind}:
  fine_tuner:
    type: pytorch
    config:
      base_model: {{name: tiny-llama-{kind}, huggingface_id: "builtin:tiny-llama-{kind}"}}
      method: {{type: lora, r: 16, alpha: 32, dropout: 0.0,
               target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}}
      training_args: {{max_steps: 40, per_device_train_batch_size: 4, learning_rate: 5e-3, max_seq_length: 256,
                      logging_steps: 20, seed: 7}}
      device: cpu
"""

CONVERSATION = [
    {"role": "system", "content": "You are a careful medical assistant."},
    {"role": "user", "content": "What is anemia?"},
    {"role": "assistant", "content": "A shortage of red blood cells or hemoglobin."},
    {"role": "user", "content": "What are its symptoms?  Be brief."},
]


def _trainer_env(home: Path) -> dict:
    return {**os.environ, "LLAMAFARM_HOME": str(home), "HF_HUB_OFFLINE": "1", "LLAMAFARM_RUNNER": "local"}


def _train(root: Path, name: str) -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "finetune", "start", "--strategy", name,
         "--strategy-file", str(root / "s.yaml"), "--dataset", str(DATA), "--foreground", "--json"],
        cwd=ROOT, env=_trainer_env(root / "home"), capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    started, _ = json.JSONDecoder().raw_decode(proc.stdout)  # the start record; --foreground follows it
    return Path(started["job_dir"]) / "final"


@pytest.fixture(scope="module", params=["bpe", "spm"])
def job(request, tmp_path_factory):
    """(kind, final/ folder) of a full fine-tune on the bundled data, one per builtin tokenizer."""
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    (root / "s.yaml").write_text(STRATEGIES.format(kind=request.param))
    return request.param, _train(root, f"full_{request.param}")


@pytest.fixture(scope="module", params=["bpe", "spm"])
def lora_job(request, tmp_path_factory):
    """(kind, final/ folder) of a LoRA job on every projection, one per builtin tokenizer."""
    root = tmp_path_factory.mktemp(f"export-lora-{request.param}")
    (root / "s.yaml").write_text(STRATEGIES.format(kind=request.param))
    return request.param, _train(root, f"lora_{request.param}")


def _export(folder: Path, fmt: str, quantization: str | None, tmp_path: Path, name: str | None = None) -> dict:
    from trainer.export.run import export

    return export(folder, fmt, quantization, tmp_path / f"{fmt}-{quantization}", name)


@pytest.mark.parametrize("quantization", ["f32", "f16", "q8_0", "q4_k_m"])
def test_gguf_matches_pytorch(job, quantization, tmp_path):
    kind, folder = job
    report = _export(folder, "gguf", quantization, tmp_path)
    v = report["verification"]
    assert v["passed"], v["problems"]
    assert v["tokenization_equal"] and v["stops_like_pytorch"]
    if quantization == "f32":
        assert v["relative_logit_diff"] <= 1e-5 and v["greedy_equal"]
    elif quantization == "f16":
        assert v["relative_logit_diff"] <= 1e-3 and v["greedy_equal"]
    else:
        assert v["top1_agreement"] >= 0.95
    # The label never claims more than the file holds: the report lists the real tensor types.
    path = Path(report["output"]) / "model.gguf"
    reader = gguf.GGUFReader(path)
    actual: dict[str, int] = {}
    for t in reader.tensors:
        actual[t.tensor_type.name.lower()] = actual.get(t.tensor_type.name.lower(), 0) + 1
    assert report["gguf"]["tensor_types"] == actual
    if quantization in ("f32", "f16", "q8_0"):
        assert quantization in actual
    fields = reader.fields
    assert fields["tokenizer.ggml.model"].contents() == ("gpt2" if kind == "bpe" else "llama")
    if kind == "bpe":
        assert fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    assert "tokenizer.chat_template" in fields
    assert json.loads((Path(report["output"]) / "export_report.json").read_text())["verification"]["passed"]


def test_a_converter_without_the_qk_reorder_fails_verification(job, tmp_path, monkeypatch):
    from trainer.export import gguf_model

    kind, folder = job
    monkeypatch.setattr(gguf_model, "permute_qk", lambda w, n_heads: w)
    with pytest.raises(UserError, match="failed verification.*logits differ"):
        _export(folder, "gguf", "f32", tmp_path)
    assert not (tmp_path / "gguf-f32").exists()  # nothing under the real name
    report = json.loads((tmp_path / "gguf-f32.failed" / "export_report.json").read_text())
    assert report["verification"]["max_abs_logit_diff"] > 1e-2


def test_adapter_gguf_applies_like_peft(lora_job, tmp_path):
    kind, folder = lora_job
    report = _export(folder, "adapter-gguf", None, tmp_path)
    assert report["verification"]["passed"], report["verification"]["problems"]
    assert report["verification"]["relative_logit_diff"] <= 1e-5
    reader = gguf.GGUFReader(Path(report["output"]) / "adapter.gguf")
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(32.0)
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b", "blk.3.ffn_down.weight.lora_b"} <= names
    assert len(names) == 4 * 7 * 2


def test_lora_job_gguf_merges_the_adapter_as_it_streams(lora_job, tmp_path):
    kind, folder = lora_job
    report = _export(folder, "gguf", "f32", tmp_path)
    assert report["verification"]["passed"] and report["verification"]["relative_logit_diff"] <= 1e-5


def test_full_weights_have_no_adapter_to_export(job, tmp_path):
    kind, folder = job
    with pytest.raises(UserError, match="holds full weights, not a LoRA adapter; use --format gguf or ollama"):
        _export(folder, "adapter-gguf", None, tmp_path)


def test_merged_weights_reload_as_the_trained_model(lora_job, tmp_path):
    from transformers import AutoConfig

    kind, folder = lora_job
    report = _export(folder, "merged", "f32", tmp_path)
    out = Path(report["output"])
    assert report["merged"]["relative_logit_diff"] <= 1e-5
    assert not (out / "adapter_config.json").exists()
    assert (out / "model.safetensors").exists() and (out / "generation_config.json").exists()
    assert (out / "tokenizer.json").exists() and AutoConfig.from_pretrained(out).model_type == "llama"


def _go_render(template: str, messages: list[dict], tools: list[dict] = ()) -> str:
    if not shutil.which("go"):
        pytest.fail("Go is needed to render Ollama templates exactly as Ollama does; scripts/test.sh installs golang-go")
    stdin = json.dumps({"template": template, "messages": messages, "tools": list(tools)})
    proc = subprocess.run(["go", "run", "."], cwd=GO_RENDERER, input=stdin,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "GOFLAGS": "-mod=mod"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _modelfile_template(modelfile: str) -> str:
    start = modelfile.index('TEMPLATE """') + len('TEMPLATE """')
    return modelfile[start : modelfile.index('"""', start)]


def test_ollama_folder_template_gives_the_training_tokens(job, tmp_path):
    from transformers import AutoTokenizer

    from trainer.data.tokenize import ConversationEncoder, choose_template
    from trainer.export.llamacpp import GgufModel

    kind, folder = job
    report = _export(folder, "ollama", "q8_0", tmp_path)
    out = Path(report["output"])
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf\n")
    assert "PARAMETER num_ctx 256" in modelfile
    tokenizer = AutoTokenizer.from_pretrained(folder)
    template, _ = choose_template("auto", tokenizer)
    encoder = ConversationEncoder(tokenizer, template, 256, False, "truncate")
    for stop in {*template.stop_strings, tokenizer.eos_token}:
        assert f"PARAMETER stop {json.dumps(stop)}" in modelfile
    # Ollama: BOS from the GGUF's add_bos flag, then the rendered TEMPLATE with special tokens parsed.
    rendered = _go_render(_modelfile_template(modelfile), CONVERSATION)
    gg = GgufModel(out / "model.gguf")
    ollama_ids = ([gg.bos] if gg.add_bos else []) + gg.llm.tokenize(rendered.encode(), add_bos=False, special=True)
    assert ollama_ids == encoder.prompt_ids(CONVERSATION)
    # ... which is, token for token, the start of the training row for the same conversation.
    answered = [*CONVERSATION, {"role": "assistant", "content": "Tiredness and pale skin."}]
    train_ids, _ = encoder.encode(answered)
    assert train_ids[: len(ollama_ids)] == ollama_ids


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_named_template_has_an_exact_ollama_form(name):
    """Go's rendering of each TEMPLATE equals the Jinja rendering used in training, minus the opening BOS."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = TEMPLATES[name]
    bos, eos = "<s>", "</s>"
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    for messages in (CONVERSATION, CONVERSATION[1:], CONVERSATION[1:2]):
        if name == "mistral" and messages[0]["role"] == "system":
            pass  # mistral folds the system prompt into the first [INST]; both forms do the same
        jinja = env.from_string(template.jinja).render(messages=messages, bos_token=bos, eos_token=eos,
                                                       add_generation_prompt=True)
        go = _go_render(template.ollama_template(bos, eos), messages)
        assert go == jinja.removeprefix(bos), (name, go, jinja)


def test_cli_export_runs_ollama_create_and_generate_answers_from_the_gguf(job, tmp_path, monkeypatch):
    kind, folder = job
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    # A stand-in for the ollama binary that records how it was called (no Ollama on these machines).
    (fake_bin / "ollama").write_text(f"#!/bin/sh\necho \"$PWD $@\" > {tmp_path}/ollama-called\n")
    (fake_bin / "ollama").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "ollama"
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "finetune", "export", "--model-path", str(folder),
                           "--format", "ollama", "--quantization", "f16", "--output", str(out), "--name", "tiny-med",
                           "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ollama"] == {"created": "tiny-med"}
    assert (tmp_path / "ollama-called").read_text().split() == [str(out), "create", "tiny-med", "-f", str(out / "Modelfile")]
    # The Ollama export folder itself answers (through its model.gguf and its Modelfile's settings).
    answer = subprocess.run([sys.executable, "-m", "orchestrator.cli", "generate", "--model", str(out),
                             "--prompt", "What are the symptoms of anemia?", "--max-new-tokens", "200", "--greedy"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert answer.returncode == 0, answer.stderr
    assert "sampling: greedy, repeat_penalty 1.1 over 64 tokens" in answer.stderr
    torch_answer = subprocess.run([sys.executable, "-m", "orchestrator.cli", "generate", "--model", str(folder),
                                   "--prompt", "What are the symptoms of anemia?", "--max-new-tokens", "200", "--greedy"],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    # The same greedy answer (Ollama's repeat penalty included) through llama.cpp as through PyTorch,
    # and it stops (no 200-token ramble).
    from transformers import AutoTokenizer

    assert answer.stdout.strip() and answer.stdout.strip() == torch_answer.stdout.strip()
    assert len(AutoTokenizer.from_pretrained(folder)(answer.stdout.strip())["input_ids"]) < 150
    assert report["verification"]["stops_like_pytorch"]


def test_bad_export_requests_are_refused_clearly(job, tmp_path, run_cli):
    kind, folder = job
    from trainer.export.run import export

    with pytest.raises(UserError, match="merged weights are saved as f32, f16, bf16"):
        export(folder, "merged", "q8_0", tmp_path / "m", None)
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists; choose another --output or pass --force"):
        export(folder, "gguf", "f32", tmp_path / "exists", None)
    assert (tmp_path / "exists" / "keep.txt").read_text() == "mine"
    result = run_cli("finetune", "export", "--model-path", "no-such-job", "--format", "gguf")
    assert result.exit_code == 1 and "no job with id 'no-such-job'" in result.output
    result = run_cli("finetune", "export", "--model-path", str(folder), "--format", "gguf", "--quantization", "q3")
    assert result.exit_code == 1 and "'q3' is not one of" in result.output


def test_k_quants_without_llama_cpp_say_how_to_get_it(monkeypatch):
    from trainer.export import llamacpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    with pytest.raises(UserError, match="needs llama-cpp-python, which is not installed; install it"):
        llamacpp.llama_cpp_module("quantization q4_k_m")


@pytest.fixture(scope="module")
def real_model():
    """The real SmolLM2-135M-Instruct folder (builtin, cached per machine), exported as any Hugging Face
    folder is: its own ChatML template with the default system prompt, the real 49k vocabulary."""
    from trainer.models.builtin import builtin_path

    return builtin_path("builtin:smollm2-135m-instruct")


@pytest.mark.parametrize("quantization", ["q8_0", "q4_k_m"])
def test_real_model_exports_verified_and_its_modelfile_renders_the_training_tokens(real_model, quantization, tmp_path):
    from transformers import AutoTokenizer

    from trainer.data.tokenize import ConversationEncoder, choose_template
    from trainer.export.llamacpp import GgufModel

    report = _export(real_model, "ollama", quantization, tmp_path)  # raises unless verification passed
    assert report["verification"]["tokenization_equal"] and report["ollama_template"] == "chatml-smollm2"
    out = Path(report["output"])
    modelfile = (out / "Modelfile").read_text()
    tokenizer = AutoTokenizer.from_pretrained(real_model)
    template, _ = choose_template("auto", tokenizer)
    encoder = ConversationEncoder(tokenizer, template, 512, False, "truncate")
    gg = GgufModel(out / "model.gguf")
    # No system message: Ollama's TEMPLATE adds SmolLM2's default one, exactly as training's template did.
    for conversation in (CONVERSATION[1:], CONVERSATION):
        rendered = _go_render(_modelfile_template(modelfile), conversation)
        ollama_ids = ([gg.bos] if gg.add_bos else []) + gg.llm.tokenize(rendered.encode(), add_bos=False, special=True)
        assert ollama_ids == encoder.prompt_ids(conversation)
    assert "You are a helpful AI assistant named SmolLM" in _go_render(_modelfile_template(modelfile), CONVERSATION[1:])
