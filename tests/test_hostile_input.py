"""Hostile input, round two (issue 17): each case once crashed with a traceback or was silently
accepted; now it is one `Error:` line, exit 1, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from contract.job_folder import JOB_FILE, update_job
from contract.strategy import parse_strategy
from orchestrator import jobs
from orchestrator.plan import make_plan

from conftest import DATASETS

QA = str(DATASETS / "medical_qa.jsonl")


def _refused(result, message):
    assert result.exit_code == 1, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert result.output.count("Error:") == 1, result.output


# --- 1, 2: non-finite, absurd and boolean numbers ------------------------------------------------

@pytest.mark.parametrize("value, message", [
    ("inf", "num_train_epochs: Input should be a finite number"),
    ("1e400", "num_train_epochs: Input should be a finite number"),
    ("1e300", "num_train_epochs: Input should be less than or equal to 1000000"),
    ("true", "num_train_epochs: true is a boolean; this key takes a number"),
])
def test_absurd_epochs_are_schema_errors(run_cli, value, message):
    _refused(run_cli("finetune", "estimate", "--strategy", "tiny_demo", "--dataset", QA,
                     "--set", f"training_args.num_train_epochs={value}"), message)


def test_infinity_in_a_strategy_file_fails_validate(run_cli, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("inf_epochs:\n  fine_tuner:\n    config:\n      base_model: {huggingface_id: 'builtin:tiny-llama-spm'}\n"
                    "      training_args: {num_train_epochs: 1e400, seed: 99999999999}\n")
    result = run_cli("finetune", "strategies", "validate", path)
    assert result.exit_code == 1
    assert "num_train_epochs: Input should be a finite number" in result.output
    assert "seed: Input should be less than or equal to 4294967295" in result.output


def test_a_boolean_is_never_a_number(run_cli):
    _refused(run_cli("finetune", "estimate", "--strategy", "tiny_demo", "--dataset", QA,
                     "--set", "training_args.learning_rate=true"),
             "training_args.learning_rate: true is a boolean; this key takes a number")
    base = {"base_model": {"huggingface_id": "builtin:tiny-llama-spm"}}
    ok = parse_strategy("t", {"fine_tuner": {"config": {**base, "training_args": {
        "learning_rate": "3e-4", "torch_compile": False, "gradient_checkpointing": True}}}})
    assert ok.cfg.training_args.learning_rate == 3e-4 and ok.cfg.training_args.torch_compile is False


def test_base_model_name_defaults_from_the_id():
    s = parse_strategy("t", {"fine_tuner": {"config": {"base_model": {"huggingface_id": "meta-llama/Llama-3.2-3B"}}}})
    assert s.cfg.base_model.name == "Llama-3.2-3B"
    s = parse_strategy("t", {"fine_tuner": {"config": {"base_model": {"huggingface_id": "builtin:tiny-llama-spm"}}}})
    assert s.cfg.base_model.name == "tiny-llama-spm"


# --- 3, 6, 7: dataset readers ----------------------------------------------------------------------

def test_deeply_nested_json_is_a_line_error(run_cli, tmp_path):
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"instruction": "a", "output": "b"}\n' + "[" * 100_000 + "\n")
    _refused(run_cli("finetune", "dataset", "validate", deep), f"{deep}:2: not valid JSON for a dataset (nested too deeply")
    _refused(run_cli("run", "--strategy", "tiny_demo", "--dataset", deep), f"{deep}:2: not valid JSON")
    (tmp_path / "deep.json").write_text("[" * 100_000)
    _refused(run_cli("finetune", "dataset", "validate", tmp_path / "deep.json"), "nested too deeply")


def test_latin1_csv_names_the_row(run_cli, tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(b"instruction,output\nWhat is flu?,A virus.\ncaf\xe9,x\n")
    result = run_cli("finetune", "dataset", "validate", path)
    _refused(result, f"{path}:3: not UTF-8 text")
    assert "DatasetGenerationError" not in result.output and "Failed to read file" not in result.output


def test_header_only_csv_has_no_rows(run_cli, tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("instruction,output\n")
    _refused(run_cli("finetune", "dataset", "validate", path), f"dataset {path} has no rows")


def test_mixed_formats_name_the_first_row_of_the_other(run_cli, write_jsonl):
    alpaca = {"instruction": "a", "output": "b"}
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = write_jsonl([alpaca, alpaca, chat, alpaca, chat])
    _refused(run_cli("finetune", "dataset", "validate", path),
             f"{path}:3: mixes formats (alpaca, chat): this is the first chat row, after alpaca rows from {path}:1")


# --- 4, 5: job list and monitor ------------------------------------------------------------------

def _job(status="completed"):
    strategy = parse_strategy("t", {"fine_tuner": {"config": {"base_model": {"huggingface_id": "builtin:tiny-llama-spm"}}}})
    folder = jobs.create("t", strategy, Path("t.yaml"), Path(QA), None, {}, make_plan(strategy, "local"))
    update_job(folder, status=status, pid=1)
    return folder


def test_one_truncated_job_file_never_takes_down_the_list(run_cli):
    good, bad = _job(), _job()
    text = (bad / JOB_FILE).read_text()
    (bad / JOB_FILE).write_text(text[: len(text) // 2])
    result = run_cli("finetune", "jobs")
    assert result.exit_code == 0 and "Traceback" not in result.output
    assert f"{good.name}" in result.output and "completed" in result.output
    assert f"{bad.name}" in result.output and "unreadable" in result.output
    assert f"job file {bad / JOB_FILE} is unreadable" in result.output
    listed = {j["job_id"]: j["status"] for j in json.loads(run_cli("finetune", "jobs", "--json").output)}
    assert listed == {good.name: "completed", bad.name: "unreadable"}
    _refused(run_cli("finetune", "monitor", "--job-id", bad.name), f"job file {bad / JOB_FILE} is unreadable")


@pytest.mark.parametrize("where", ["under_a_file", "proc", "bad_suffix"])
def test_monitor_plot_to_an_impossible_path(run_cli, tmp_path, where):
    folder = _job()
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "learning_rate": 1e-4}) + "\n")
    (tmp_path / "afile").write_text("mine")
    target = {"under_a_file": tmp_path / "afile" / "plot.png", "proc": Path("/proc/llamafarm/plot.png"),
              "bad_suffix": tmp_path / "plot.notanimage"}[where]
    _refused(run_cli("finetune", "monitor", "--job-id", folder.name, "--plot", target),
             f"cannot write the plot to {target}")
    assert (tmp_path / "afile").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "home") == ["afile"]


# --- Messages ------------------------------------------------------------------------------------

def test_usage_errors_and_ours_share_exit_code_1(run_cli):
    for argv in (["nope"], ["finetune", "start"], ["--bogus"], ["generate", "--model", "x"]):
        result = run_cli(*argv)
        assert result.exit_code == 1 and "Error: " in result.output, (argv, result.output)


def test_empty_prompt_is_refused(run_cli):
    _refused(run_cli("generate", "--model", "x", "--prompt", "  "), "--prompt is empty")


def test_validate_says_invalid_once(run_cli, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"broken": {"fine_tuner": {"config": {"method": {"r": 0}}}}}))
    result = run_cli("finetune", "strategies", "validate", path)
    assert "invalid strategy 'broken'" in result.output and "invalid invalid" not in result.output


def test_offline_hub_message_does_not_suggest_logging_in(run_cli):
    result = run_cli("run", "--strategy", "cpu_fine_tuning", "--dataset", QA)
    _refused(result, "is not in the local Hugging Face cache and HF_HUB_OFFLINE=1")
    assert "HF_TOKEN" not in result.output and "log in" not in result.output


def test_messages_name_the_strategy_file_option(run_cli):
    _refused(run_cli("finetune", "strategies", "list", "--strategy-file", "nope.yaml"), "(from --strategy-file or")


def test_no_doubled_words_in_json_errors(run_cli, write_jsonl):
    path = write_jsonl(['{"instruction": "x', '{"instruction": "x", "output": '])
    result = run_cli("finetune", "dataset", "validate", path)
    assert f"{path}:1: not valid JSON (Unterminated string starting at column 17)" in result.output
    assert f"{path}:2: not valid JSON (Expecting value at column 32)" in result.output


# --- 8: --force replaces only what an export wrote -----------------------------------------------

def test_export_force_never_deletes_the_users_own_folder(monkeypatch, tmp_path):
    from contract.errors import UserError
    from trainer.export import run as export_run

    monkeypatch.setattr(export_run, "_resolve", lambda *a: (None, "gguf", "f32", False))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match=r"exists and was not written by an export \(it has no export_report.json\); "
                                        "--force only replaces an earlier export's folder"):
        export_run.export(tmp_path, "gguf", "f32", mine, None, force=True)
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "home") == ["mine"]
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "export_report.json").write_text("{}")
    export_run._check_replaceable(earlier, force=True)  # an earlier export: may be replaced
    with pytest.raises(UserError, match="pass --force to replace it"):
        export_run._check_replaceable(earlier, force=False)


# --- 9: Ctrl-C on a foreground job stops it --------------------------------------------------------

def test_ctrl_c_on_a_foreground_job_stops_it(monkeypatch, capsys):
    from orchestrator import monitor
    from orchestrator.cli import jobs_cmd

    folder = _job(status="running")
    stops = []

    class Runner:
        def stop(self, job):  # what the trainer does on SIGTERM: checkpoint, then `stopped`
            stops.append(job["job_id"])
            update_job(folder, status="stopped")

    calls = {"n": 0}
    real_follow = monitor.follow

    def follow(folder, echo=print, interval=1.0):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return real_follow(folder, interval=0.01, echo=echo)

    monkeypatch.setattr(monitor, "follow", follow)
    monkeypatch.setattr(jobs, "pid_alive", lambda pid: True)  # pid 1 stands for a live trainer
    with pytest.raises(SystemExit) as exited:
        jobs_cmd.follow_in_foreground(folder, Runner(), echo=print)
    assert exited.value.code == 130
    assert stops == [folder.name]
    out = capsys.readouterr().out
    assert f"Ctrl-C: stopping job {folder.name}; it saves a checkpoint, then ends as stopped" in out
    assert f"job {folder.name} stopped" in out


def test_ctrl_c_elsewhere_exits_130_without_aborted(run_cli, monkeypatch):
    from orchestrator import jobs as jobs_module

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs_module, "list_jobs", interrupted)
    result = run_cli("finetune", "jobs")
    assert result.exit_code == 130 and "interrupted (Ctrl-C)" in result.output and "Aborted" not in result.output


# --- 11: after a resume, elapsed runs on and the ETA comes from the measured rate -------------------

def test_elapsed_runs_on_across_a_resume(tmp_path):
    from contract.job_folder import append_metrics
    from orchestrator.monitor import summary
    from trainer.loop import elapsed_before

    folder = _job(status="running")
    for step in range(1, 161):  # 160 steps at 1 s each before the kill; the checkpoint is at step 150
        append_metrics(folder, {"step": step, "total_steps": 500, "loss": 1.0, "elapsed": float(step)})
    assert elapsed_before(folder, 150) == 150.0
    s = summary({"job_id": "j", "status": "running"}, [{"step": 160, "total_steps": 500, "loss": 1.0, "elapsed": 160.0}])
    assert (s["elapsed"], s["eta_seconds"]) == (160.0, 340.0)


# --- the seed's own path flow ------------------------------------------------------------------------

def test_the_documented_paths_answer_with_the_command_that_works(run_cli, tmp_path):
    result = run_cli("finetune", "export", "--model-path", "./fine_tuned_models/model/", "--format", "ollama")
    _refused(result, "model folder ./fine_tuned_models/model/ does not exist; a job's model is named by its job id")
    export_dir = tmp_path / "exported"
    export_dir.mkdir()
    (export_dir / "export_report.json").write_text("{}")
    (export_dir / "model-q8_0.gguf").write_bytes(b"GGUF")
    assert jobs.export_gguf(export_dir) == export_dir / "model-q8_0.gguf", "generate --model EXPORT_DIR uses its GGUF"
    assert jobs.export_gguf(tmp_path) is None


# --- 12: a long estimate is said, past a threshold the strategy or user sets ---------------------------

def test_a_long_estimate_warns(run_cli):
    quick = run_cli("finetune", "estimate", "--strategy", "tiny_demo", "--dataset", QA)
    assert quick.exit_code == 0 and "warning:" not in quick.output
    slow = run_cli("finetune", "estimate", "--strategy", "tiny_demo", "--dataset", QA,
                   "--set", "training_args.num_train_epochs=100000", "--set", "time_warning_hours=1")
    assert slow.exit_code == 0 and "longer than time_warning_hours (1 h)" in slow.output, slow.output
