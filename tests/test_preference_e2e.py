"""Preference tuning end to end on the SentencePiece builtin: a DPO job raises held-out preference
accuracy on the bundled rule-following pairs, writes its reward metrics, and ORPO/KTO train too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from contract.job_folder import read_job, read_metrics

from conftest import DATASETS

pytestmark = pytest.mark.slow  # trains, exports or evaluates real jobs

PAIRS, HELD_OUT = DATASETS / "arithmetic_preference.jsonl", DATASETS / "arithmetic_preference_eval.jsonl"


def _strategy(tmp_path, stage: str, **method) -> Path:
    raw = yaml.safe_load((Path(__file__).parents[1] / "strategies" / "default_strategies.yaml").read_text())["tiny_dpo"]
    cfg = raw["fine_tuner"]["config"]
    cfg["base_model"] = {"name": "spm", "huggingface_id": "builtin:tiny-llama-spm"}  # the faster builtin
    cfg["method"].update(stage=stage, **method)
    if stage != "dpo":
        cfg["method"].pop("dpo_loss")
    cfg["training_args"].update(max_steps=4, logging_steps=2, precision="fp32")
    cfg["dataset"].update(eval_file=str(HELD_OUT))
    cfg["device"] = "cpu"
    path = tmp_path / f"pref_{stage}.yaml"
    path.write_text(yaml.safe_dump({f"pref_{stage}": raw}))
    return path


def _run(run_cli, path: Path) -> tuple[dict, list[dict], str]:
    out = run_cli("finetune", "start", "--strategy", path.stem, "--strategy-file", str(path), "--dataset", str(PAIRS),
                  "--runner", "local", "--foreground", "--json")
    assert out.exit_code == 0, out.output
    folder = Path(json.loads(out.stdout[out.stdout.index("{"):])["job_dir"])
    return read_job(folder), read_metrics(folder), (folder / "train.log").read_text()


def test_dpo_raises_held_out_preference_accuracy(run_cli, tmp_path, write_jsonl):
    job, metrics, log = _run(run_cli, _strategy(tmp_path, "dpo"))
    assert job["status"] == "completed", log
    assert "reference model: base with the adapter off (lora: no copy)" in log
    assert "packing: off (method.stage dpo: a chosen and a rejected answer never share a sequence)" in log
    train = [m for m in metrics if "loss" in m]
    assert {"rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"} <= set(train[0])
    final = [m for m in metrics if "eval_loss" in m][-1]
    # Before training every reward is 0, so no held-out pair is ranked right (chance would be 0.5).
    # Measured after 4 steps: accuracy 1.0, margin ~4.5, eval loss ~0.01 (log 2 = 0.69 at the start).
    assert final["eval_reward_accuracy"] >= 0.8
    assert final["eval_reward_margin"] > 1.0 and final["eval_loss"] < 0.4

    # `evaluate` on the same held-out pairs: the job's DPO metrics against its base are training's last eval
    # (same pairs, same reference, fp32), and the job finds the chosen answers likelier than its base does.
    out = run_cli("finetune", "evaluate", "--model", job["job_id"], "--dataset", str(HELD_OUT), "--samples", "1",
                  "--max-new-tokens", "4", "--json")
    assert out.exit_code == 0, out.output
    ev = json.loads(out.stdout[out.stdout.index("{"):])
    assert ev["data"] == "pairs" and ev["rows"] == 40 and ev["preference"]["stage"] == "dpo"
    for name in ("loss", "reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected"):
        assert ev["preference"][name] == pytest.approx(final[f"eval_{name}"], abs=1e-3), name
    # Measured: the base ranks 0 of the 40 pairs right (its rejected answers are shorter), the job ~0.3-0.5;
    # the mean log-prob margin rises from about -27 to about -2.
    base, tuned = ev["base"], ev["fine_tuned"]
    assert tuned["preference_margin"] > base["preference_margin"] + 5
    assert tuned["preference_accuracy"] > base["preference_accuracy"]
    shown = run_cli("finetune", "evaluate", "--model", job["job_id"], "--dataset", str(HELD_OUT), "--samples", "0")
    assert shown.exit_code == 0 and "dpo objective (base as reference): loss" in shown.output, shown.output

    # KTO's single labelled answers cannot score a DPO job: one clear line before any model loads.
    kto = write_jsonl([{"prompt": "What is 2 plus 2?", "completion": "4", "label": True}])
    refused = run_cli("finetune", "evaluate", "--model", job["job_id"], "--dataset", str(kto))
    assert refused.exit_code == 1 and "score a kto job only, and this model is method.stage dpo" in refused.output
    assert "Traceback" not in refused.output


@pytest.mark.parametrize("stage", ["orpo", "kto"])
def test_orpo_and_kto_train_on_the_same_pairs(run_cli, tmp_path, stage):
    job, metrics, log = _run(run_cli, _strategy(tmp_path, stage))
    assert job["status"] == "completed", log
    final = [m for m in metrics if "eval_loss" in m][-1]
    assert final["eval_reward_accuracy"] >= 0.6, final  # measured after 4 steps: see the report
