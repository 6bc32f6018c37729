"""The llamafarm CLI: strategies commands, bad input, and start-up without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import DATASETS, ROOT
from orchestrator.runners import RUNNERS


def test_strategies_list_and_json(run_cli):
    result = run_cli("finetune", "strategies", "list")
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines()]
    assert names == ["cpu_fine_tuning", "cuda_fine_tuning", "llamafactory_advanced", "m1_fine_tuning", "smollm2_medical", "tiny_demo",
                     "tiny_dpo"]
    rows = json.loads(run_cli("finetune", "strategies", "list", "--json").output)
    tiny = next(r for r in rows if r["name"] == "tiny_demo")
    assert (tiny["base_model"], tiny["method"], tiny["device"]) == ("builtin:tiny-llama-bpe", "full", "auto")
    assert tiny["base_model_name"] == "tiny-llama-bpe"


def test_strategies_list_shows_files_as_written_and_marks_broken_ones(run_cli, tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("weird:\n  fine_tuner: just-a-string\n"
                    "minimal:\n  fine_tuner: {config: {base_model: {name: x, huggingface_id: 'builtin:tiny-llama-spm'}}}\n")
    result = run_cli("finetune", "strategies", "list", "--strategy-file", mine)
    assert result.exit_code == 0
    lines = {line.split()[0]: line.split() for line in result.output.splitlines()}
    assert lines["weird"][1:4] == ["INVALID", "(1", "problem;"]
    assert f"`llamafarm finetune strategies validate {mine}`" in result.output
    assert lines["minimal"][1:4] == ["default", "default", "builtin:tiny-llama-spm"]
    rows = {r["name"]: r for r in json.loads(run_cli("finetune", "strategies", "list", "--json",
                                                     "--strategy-file", mine).output)}
    assert (rows["weird"]["valid"], rows["weird"]["problems"]) == (False, ["fine_tuner: Input should be a valid dictionary or instance of FineTuner"])
    assert rows["minimal"]["valid"] and rows["tiny_demo"]["valid"]
    shown = run_cli("finetune", "strategies", "show", "weird", "--strategy-file", mine)
    assert shown.exit_code == 1 and "fine_tuner: Input should be a valid dictionary" in shown.output


def test_strategies_show_fills_defaults(run_cli):
    result = run_cli("finetune", "strategies", "show", "m1_fine_tuning")
    assert result.exit_code == 0
    shown = yaml.safe_load(result.output)["m1_fine_tuning"]["fine_tuner"]["config"]
    assert shown["training_args"]["seed"] == 42 and shown["training_args"]["learning_rate"] == 3e-4
    data = json.loads(run_cli("finetune", "strategies", "show", "tiny_demo", "--json").output)
    assert data["strategy"]["fine_tuner"]["config"]["method"] == {"type": "full", "stage": "sft"}


def test_strategies_validate(run_cli, tmp_path):
    ok = run_cli("finetune", "strategies", "validate", ROOT / "strategies")
    assert ok.exit_code == 0 and ok.output.count("ok ") == 7
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"broken": {"fine_tuner": {"config": {"base_model": {"name": "x"}, "method": {"r": 0}}}}}))
    result = run_cli("finetune", "strategies", "validate", bad)
    assert result.exit_code == 1
    assert "fine_tuner.config.base_model.huggingface_id: required key is missing" in result.output
    assert "fine_tuner.config.method.r: Input should be greater than 0" in result.output
    assert "Error: 1 invalid strategy" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--strategy", "tiny_dem"], "unknown strategy 'tiny_dem'; did you mean tiny_demo, tiny_dpo?"),
        (["--strategy", "tiny_demo", "--dataset", "missing.jsonl"], "dataset missing.jsonl does not exist"),
        (["--strategy", "tiny_demo", "--set", "training_args.learning_rat=1"], "has no key 'learning_rat'"),
        (["--strategy", "tiny_demo", "--set", "training_args.learning_rate=-1"],
         "fine_tuner.config.training_args.learning_rate: Input should be greater than 0"),
        (["--strategy", "tiny_demo", "--set", "method.r=8"], "r only apply to lora and qlora, not to method type full"),
        (["--strategy", "tiny_demo", "--runner", "slurm"], f"unknown runner 'slurm'; valid: {', '.join(RUNNERS)}"),
        (["--strategy", "llamafactory_advanced"], "device 'cuda' is not available on this machine"),
        (["--strategy", "cuda_fine_tuning"], "device 'cuda' is not available on this machine"),
        (["--strategy", "cpu_fine_tuning"], "base model TinyLlama/TinyLlama-1.1B-Chat-v1.0 is not in the local Hugging Face cache and HF_HUB_OFFLINE=1"),
    ],
)
def test_bad_start_gives_one_clear_message_and_no_job(run_cli, _isolated_home, args, message):
    if "--dataset" not in args:
        args = [*args, "--dataset", DATASETS / "medical_qa.jsonl"]
    result = run_cli("finetune", "start", *args)
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (_isolated_home / "jobs").exists() or not any((_isolated_home / "jobs").iterdir())


def test_bad_dataset_rows_name_file_and_line(run_cli, write_jsonl, _isolated_home):
    path = write_jsonl([{"instruction": "a", "output": "b"}, "{oops", {"instruction": "c"}])
    result = run_cli("run", "--strategy", "tiny_demo", "--dataset", path)
    assert result.exit_code == 1
    assert f"{path}:2: not valid JSON" in result.output and f"{path}:3: alpaca row is missing 'output'" in result.output
    empty = write_jsonl([], "empty.jsonl")
    result = run_cli("run", "--strategy", "tiny_demo", "--dataset", empty)
    assert result.exit_code == 1 and "has no rows" in result.output
    assert not (_isolated_home / "jobs").exists()


def test_job_commands_on_unknown_jobs(run_cli):
    for args in (["finetune", "monitor", "--job-id", "nope"], ["finetune", "stop", "--job-id", "nope"],
                 ["generate", "--model", "nope", "--prompt", "hi"]):
        result = run_cli(*args)
        assert result.exit_code == 1 and "no job with id 'nope'" in result.output
    result = run_cli("finetune", "monitor", "--job-id", "../etc")
    assert result.exit_code == 1 and "invalid job id '../etc'" in result.output
    assert run_cli("finetune", "jobs").output.startswith("no jobs yet")
    assert json.loads(run_cli("finetune", "jobs", "--json").output) == []


def test_every_command_has_a_worked_example(run_cli):
    from orchestrator.cli import cli

    def walk(cmd, path):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])

    for path, _ in walk(cli, []):
        out = run_cli(*path, "--help").output
        assert "Example:" in out and "llamafarm " in out.split("Example:")[1], path


def test_cli_start_up_imports_no_torch():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from orchestrator.cli import cli\n"
        "for args in (['--help'], ['finetune', 'strategies', 'list'], ['finetune', 'jobs'],\n"
        "             ['run', '--strategy', 'tiny_demo', '--dataset', 'missing.jsonl']):\n"
        "    CliRunner().invoke(cli, args)\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_listing_commands_stay_light():
    """`--help`, `strategies list` and `jobs` load no torch and not even the schema library."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from orchestrator.cli import cli\n"
        "for args in (['--help'], ['finetune', 'strategies', 'list'], ['finetune', 'jobs']):\n"
        "    assert CliRunner().invoke(cli, args).exit_code == 0\n"
        "heavy = [m for m in ('torch', 'transformers', 'pydantic', 'huggingface_hub') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_python_cli_py_form_works():
    out = subprocess.run(
        [sys.executable, "cli.py", "finetune", "strategies", "list"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "tiny_demo" in out and "cuda_fine_tuning" in out
