"""The strategy schema, shipped strategies, user strategy files and --set overrides."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from contract.errors import StrategyError, UserError
from contract.strategy import parse_strategy, resolved_dict
from orchestrator import strategies as strat
from orchestrator.runners import RUNNERS

SHIPPED = yaml.safe_load(strat.DEFAULT_STRATEGIES.read_text())


def _minimal(**config):
    return {"fine_tuner": {"config": {"base_model": {"name": "t", "huggingface_id": "builtin:tiny-llama-spm"}, **config}}}


def test_every_shipped_strategy_validates():
    assert set(SHIPPED) == {"m1_fine_tuning", "cuda_fine_tuning", "cpu_fine_tuning", "llamafactory_advanced", "tiny_demo",
                            "tiny_dpo", "smollm2_medical"}
    for name, raw in SHIPPED.items():
        strat.validate(name, raw, "shipped")


def test_shipped_values_match_the_original_documentation():
    m1 = strat.validate("m1", SHIPPED["m1_fine_tuning"], "s").cfg
    assert (m1.base_model.huggingface_id, m1.base_model.name) == ("meta-llama/Llama-3.2-3B", "llama3.2-3b")
    assert (m1.method.type, m1.method.r, m1.method.alpha, m1.method.dropout) == ("lora", 8, 16.0, 0.1)
    assert m1.method.target_modules == ["q_proj", "v_proj"]
    assert (m1.training_args.num_train_epochs, m1.training_args.per_device_train_batch_size) == (2, 1)
    assert m1.training_args.learning_rate == 3e-4 and (m1.device, m1.fallback_device) == ("mps", "cpu")
    cuda = strat.validate("c", SHIPPED["cuda_fine_tuning"], "s").cfg
    assert (cuda.method.type, cuda.method.r, cuda.method.alpha) == ("qlora", 64, 128.0)
    assert cuda.method.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    ta = cuda.training_args
    assert (ta.num_train_epochs, ta.per_device_train_batch_size, ta.gradient_accumulation_steps) == (3, 4, 4)
    assert (ta.learning_rate, ta.precision, cuda.device) == (2e-4, "bf16", "cuda")
    cpu = strat.validate("p", SHIPPED["cpu_fine_tuning"], "s").cfg
    assert cpu.base_model.huggingface_id == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert (cpu.method.r, cpu.method.alpha, cpu.training_args.learning_rate, cpu.device) == (4, 8.0, 5e-4, "cpu")
    lf = strat.validate("l", SHIPPED["llamafactory_advanced"], "s")
    ta = lf.cfg.training_args
    assert lf.fine_tuner.type == "llamafactory" and (lf.cfg.method.r, lf.cfg.method.alpha) == (32, 64.0)
    assert (ta.num_train_epochs, ta.per_device_train_batch_size, ta.gradient_accumulation_steps) == (3, 2, 8)
    assert (ta.learning_rate, ta.max_seq_length, ta.gradient_checkpointing) == (1e-4, 2048, True)


def test_string_numbers_are_coerced():
    s = parse_strategy("x", _minimal(training_args={"learning_rate": "3e-4", "per_device_train_batch_size": "2"}))
    assert s.cfg.training_args.learning_rate == 3e-4
    assert s.cfg.training_args.per_device_train_batch_size == 2


def test_every_error_is_reported_at_once_with_its_path():
    raw = _minimal(
        training_args={"learning_rate": -1, "num_train_epochs": "many", "warmup_steps": 10},
        method={"type": "lora", "r": 0},
        device="tpu",
    )
    with pytest.raises(StrategyError) as info:
        parse_strategy("bad", raw)
    assert sorted(info.value.problems) == sorted(
        [
            "fine_tuner.config.training_args.learning_rate: Input should be greater than 0",
            "fine_tuner.config.training_args.num_train_epochs: Input should be a valid number, unable to parse string as a number",
            "fine_tuner.config.training_args.warmup_steps: unknown key (check the spelling; `llamafarm finetune strategies show` lists valid keys)",
            "fine_tuner.config.method.r: Input should be greater than 0",
            "fine_tuner.config.device: Input should be 'auto', 'cuda', 'mps' or 'cpu'",
        ]
    )


def test_missing_base_model_is_reported():
    with pytest.raises(StrategyError) as info:
        parse_strategy("x", {"fine_tuner": {"config": {}}})
    assert info.value.problems == ["fine_tuner.config.base_model: required key is missing"]


def test_keys_that_would_be_ignored_are_rejected():
    with pytest.raises(StrategyError, match="r only apply to lora and qlora, not to method type full"):
        parse_strategy("x", _minimal(method={"type": "full", "r": 8}))
    with pytest.raises(StrategyError, match="fallback_to_lora only applies to method type qlora"):
        parse_strategy("x", _minimal(method={"type": "lora", "fallback_to_lora": True}))


def test_registry_names_are_checked_and_listed():
    raw = _minimal(runner="kubernetes", dataset={"template": "vicuna"}, method={"type": "qlora"}, device="cpu")
    raw["fine_tuner"]["type"] = "axolotl"
    with pytest.raises(StrategyError) as info:
        strat.validate("x", raw, "file.yaml")
    assert info.value.problems == [
        "fine_tuner.type: unknown backend 'axolotl'; valid: pytorch, llamafactory",
        f"fine_tuner.config.runner: unknown runner 'kubernetes'; valid: auto, {', '.join(RUNNERS)}",
        "fine_tuner.config.dataset.template: unknown template 'vicuna'; valid: auto, alpaca, chatml, chatml-smollm2, gemma, llama2, llama3, mistral, mistral-v3, phi3, qwen2.5",
        "fine_tuner.config.method.type: qlora needs CUDA but device is cpu; use lora, or set method.fallback_to_lora: true",
    ]


def test_resolved_strategy_round_trips_for_every_method():
    for method in ({"type": "full"}, {"type": "qlora", "fallback_to_lora": True}, {}):
        s = parse_strategy("x", _minimal(method=method))
        again = parse_strategy("x", resolved_dict(s))
        assert again == s


def test_overrides_apply_and_are_recorded():
    raw = SHIPPED["m1_fine_tuning"]
    new, applied = strat.apply_overrides(raw, ("training_args.learning_rate=1e-4", "method.target_modules=[q_proj]"))
    assert applied == {
        "fine_tuner.config.training_args.learning_rate": "1e-4",
        "fine_tuner.config.method.target_modules": ["q_proj"],
    }
    s = strat.validate("m1_fine_tuning", new, "x")
    assert s.cfg.training_args.learning_rate == 1e-4 and s.cfg.method.target_modules == ["q_proj"]
    assert raw == SHIPPED["m1_fine_tuning"], "the loaded strategy itself is untouched"
    top, _ = strat.apply_overrides(raw, ("description=hello",))
    assert top["description"] == "hello"
    filled, _ = strat.apply_overrides(raw, ("dataset.replace.name=FarmBot",))
    assert filled["fine_tuner"]["config"]["dataset"]["replace"] == {"name": "FarmBot"}, "a mapping's keys are free"


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("training_args.learning_rat=1e-4", "training_args has no key 'learning_rat' (did you mean learning_rate?)"),
        ("learning_rate=1e-4", "fine_tuner.config has no key 'learning_rate'"),
        ("training_args=3", "fine_tuner.config.training_args is a section; set one of its keys instead"),
        ("device.type=cpu", "fine_tuner.config.device is a value, not a section"),
        ("dataset.replace.name.first=Bo", "fine_tuner.config.dataset.replace.name is a value, not a section"),
        ("training_args.seed", "expected PATH=VALUE"),
        ("training_args..seed=1", "empty key in path"),
    ],
)
def test_bad_override_paths(assignment, message):
    with pytest.raises(UserError, match=re.escape(message)):
        strat.apply_overrides(copy.deepcopy(SHIPPED["tiny_demo"]), (assignment,))


def test_user_strategy_files_from_flag_env_and_folders(tmp_path, monkeypatch):
    folder = tmp_path / "mine" / "nested"
    folder.mkdir(parents=True)
    (folder / "a.yaml").write_text(yaml.safe_dump({"from_env": _minimal()}))
    single = tmp_path / "b.yml"
    single.write_text(yaml.safe_dump({"from_flag": _minimal(), "tiny_demo": _minimal()}))
    monkeypatch.setenv("LLAMAFARM_STRATEGIES", str(tmp_path / "mine"))
    entries = strat.discover((str(single),))
    assert {"from_env", "from_flag", "cpu_fine_tuning"} <= set(entries)
    assert entries["tiny_demo"].source == single, "a later file redefines a shipped name"


def test_unknown_strategy_suggests_close_names():
    with pytest.raises(UserError, match="unknown strategy 'tiny_dem'; did you mean tiny_demo, tiny_dpo\\?"):
        strat.get("tiny_dem")


def test_bad_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a:\n  b: [1, 2\n  c: 3\n")
    with pytest.raises(UserError, match=r"bad\.yaml:\d+: not valid YAML"):
        strat.read_strategy_file(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="expected a mapping of strategy names"):
        strat.read_strategy_file(bad)


def _with(method=None, dataset=None, **config):
    cfg = {"base_model": {"name": "t", "huggingface_id": "builtin:tiny-llama-bpe"}, **config}
    if method is not None:
        cfg["method"] = method
    if dataset is not None:
        cfg["dataset"] = dataset
    return {"fine_tuner": {"config": cfg}}


@pytest.mark.parametrize("method, dataset, message", [
    ({"beta": 0.2}, None, "method: Value error, beta only applies to stage dpo or orpo or kto, not to stage sft"),
    ({"stage": "orpo", "dpo_loss": "ipo"}, None, "dpo_loss only applies to stage dpo, not to stage orpo"),
    ({"stage": "dpo", "kto_desirable_weight": 2}, None, "kto_desirable_weight only applies to stage kto"),
    ({"stage": "dpo"}, {"format": "alpaca"}, "method.stage dpo needs preference data"),
    ({"stage": "dpo"}, {"format": "kto"}, "needs chosen/rejected pairs"),
    ({"stage": "dpo"}, {"packing": True}, "preference rows are never packed"),
    (None, {"format": "preference"}, "set method.stage to dpo, orpo or kto"),
])
def test_preference_keys_that_do_not_apply_are_errors(method, dataset, message):
    with pytest.raises(StrategyError) as err:
        parse_strategy("s.yaml", _with(method, dataset))
    assert message.split("Value error, ")[-1] in str(err.value)


def test_preference_defaults_live_in_the_schema_and_round_trip():
    s = parse_strategy("s.yaml", _with({"stage": "dpo"}, {"format": "preference"}))
    assert (s.cfg.method.beta, s.cfg.method.dpo_loss) == (0.1, "sigmoid")
    resolved = resolved_dict(s)["fine_tuner"]["config"]["method"]
    assert resolved["stage"] == "dpo" and "kto_desirable_weight" not in resolved
    assert parse_strategy("again", resolved_dict(s)).cfg.method == s.cfg.method
    sft = resolved_dict(parse_strategy("s.yaml", _with()))["fine_tuner"]["config"]["method"]
    assert "beta" not in sft and "dpo_loss" not in sft
