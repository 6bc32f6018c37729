"""Model families without training: LoRA targets per family (auto, fused layers, a missing name), and an
unsupported architecture refused before any weights load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contract.errors import UserError
from contract.strategy import parse_strategy
from orchestrator.plan import make_plan

# Every linear layer but the output layer, per family, as target_modules: auto resolves it.
AUTO_TARGETS = {
    "llama": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "qwen3": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "gemma2": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "phi3": ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],  # fused projections
}


def _tiny(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(config)


def _method(targets):
    return parse_strategy("t", {"fine_tuner": {"config": {"base_model": {"name": "m", "huggingface_id": "builtin:tiny-llama-bpe"},
                                                          "method": {"type": "lora", "target_modules": targets}}}}).cfg.method


@pytest.mark.parametrize("model_type", sorted(AUTO_TARGETS))
def test_auto_targets_every_linear_layer_of_the_family(model_type):
    from trainer.methods import resolve_targets

    decision = resolve_targets(_tiny(model_type), _method("auto"))
    assert decision.value == AUTO_TARGETS[model_type]
    assert decision.reason.startswith("auto: every linear layer of")


def test_a_module_the_model_lacks_is_an_error_listing_those_it_has():
    from trainer.methods import resolve_targets

    with pytest.raises(UserError, match=r"\['q_proj'\] do not exist in this model \(Phi3ForCausalLM\); its linear "
                                        r"layers are: down_proj, gate_up_proj, o_proj, qkv_proj"):
        resolve_targets(_tiny("phi3"), _method(["q_proj", "o_proj"]))


def test_schema_takes_auto_or_names_only():
    assert _method("auto").target_modules == "auto"
    with pytest.raises(UserError, match="target_modules"):
        _method("all")


def test_unsupported_architecture_is_refused_before_training(tmp_path):
    from contract.job_folder import read_job
    from orchestrator import jobs
    from trainer.entrypoint import run

    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    strategy = parse_strategy("t", {"fine_tuner": {"config": {
        "base_model": {"name": "gpt2", "huggingface_id": str(model)}, "device": "cpu"}}})
    folder = jobs.create("t", strategy, Path("t.yaml"), Path(__file__).parent.parent / "demos/datasets/medical_qa.jsonl",
                         None, {}, make_plan(strategy, "local"))
    assert run(folder) != 0
    error = read_job(folder)["error"]
    assert "GPT2LMHeadModel is not supported" in error
    assert "supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, " \
           "Gemma2ForCausalLM, Phi3ForCausalLM" in error
    assert not (folder / "final").exists()
