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
    "qwen3_moe": ["k_proj", "o_proj", "q_proj", "v_proj"],  # experts are 3-D parameters, the router no Linear
}
# A mixture's own sizes (transformers' defaults are 128 experts).
_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}


def _tiny(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  **(_MOE if model_type.endswith("_moe") else {}))
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
    assert ("experts (down_proj, gate_up_proj: 3-D parameters" in decision.reason) == model_type.endswith("_moe")


def test_naming_an_expert_projection_is_an_error_saying_experts_are_no_lora_targets():
    from trainer.methods import resolve_targets

    with pytest.raises(UserError, match=r"\['gate_up_proj'\] do not exist in this model \(Qwen3MoeForCausalLM\); its "
                                        r"linear layers are: k_proj, o_proj, q_proj, v_proj .*the experts \(down_proj, "
                                        r"gate_up_proj: 3-D parameters, not linear layers\) and the router are left out"):
        resolve_targets(_tiny("qwen3_moe"), _method(["q_proj", "gate_up_proj"]))


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
           "Gemma2ForCausalLM, Phi3ForCausalLM, Qwen3MoeForCausalLM" in error
    assert not (folder / "final").exists()


def test_mixture_experts_are_read_stacked_per_projection_as_transformers_fuses_them(tmp_path):
    import numpy as np

    from trainer.export.weights import ModelWeights

    model = _tiny("qwen3_moe")
    model.save_pretrained(tmp_path)  # transformers writes one 2-D tensor per expert
    weights = ModelWeights(tmp_path)
    experts = model.model.layers[0].mlp.experts
    gate, up = experts.gate_up_proj.detach().numpy().reshape(4, 2, 32, 32).swapaxes(0, 1)
    for proj, fused in (("gate_proj", gate), ("up_proj", up), ("down_proj", experts.down_proj.detach().numpy())):
        name = f"model.layers.0.mlp.experts.{proj}.weight"
        assert name in weights.names() and weights.shape(name) == fused.shape
        assert np.array_equal(weights.float32(name), fused)
    assert not [n for n in weights.names() if ".experts.0." in n]


@pytest.mark.parametrize("change, refused", [({"norm_topk_prob": False}, "norm_topk_prob is false"),
                                             ({"mlp_only_layers": [0]}, "dense layers")])
def test_mixture_llama_cpp_cannot_compute_is_refused(change, refused):
    import gguf

    from trainer.export.architectures import architecture_of

    config = {"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4, "num_experts_per_tok": 2,
              "moe_intermediate_size": 32, "norm_topk_prob": True, **change}
    _, spec = architecture_of(config)
    with pytest.raises(UserError, match=refused):
        spec.keys(gguf.GGUFWriter(None, "qwen3moe"), config)
