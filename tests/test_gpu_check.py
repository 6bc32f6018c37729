"""The GPU check's dry run (scripts/gpu_check.sh --dry-run) and its carry: bundles that fit one device
call each, joined back byte for byte on arrival."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_carry, gpu_check

ROOT = Path(__file__).resolve().parent.parent


def _carry(tmp_path: Path) -> tuple[Path, bytes]:
    """A carry with a fake 'model wheel' of 2.5 KiB in bundles of 1 KiB: three parts in three bundles."""
    model = tmp_path / "src" / "llm_fake-0.1-py3-none-any.whl"
    model.parent.mkdir()
    data = bytes(range(256)) * 10
    model.write_bytes(data)
    manifest = gpu_carry.write_bundles(tmp_path / "carry", [], model, {"bitsandbytes": {"mib": 70.0}}, 1 / 1024)
    assert manifest["bundles"] == 3
    assert manifest["joined"][model.name]["parts"] == [f"{model.name}.part{i}" for i in range(3)]
    return tmp_path / "carry", data


def test_pack_never_exceeds_the_bundle_size():
    sizes = {"a": 50, "b": 30, "c": 30, "d": 20, "e": 10}

    class F:
        def __init__(self, n):
            self.n = n

        def stat(self):
            return type("S", (), {"st_size": sizes[self.n]})

    bundles = gpu_carry.pack([F(n) for n in sizes], 60)
    assert sorted(sorted(f.n for f in b) for b in bundles) == [["a", "e"], ["b", "c"], ["d"]]


def test_join_restores_the_file_and_refuses_a_missing_part(tmp_path):
    carry, data = _carry(tmp_path)
    spec = gpu_check._manifest(carry)["joined"]["llm_fake-0.1-py3-none-any.whl"]
    joined = gpu_check._join(carry, "llm_fake-0.1-py3-none-any.whl", spec, tmp_path / "out")
    assert joined.read_bytes() == data
    (carry / "2" / "model" / "llm_fake-0.1-py3-none-any.whl.part1").unlink()
    with pytest.raises(gpu_check.StepFailed, match="part1"):
        gpu_check._join(carry, "llm_fake-0.1-py3-none-any.whl", spec, tmp_path / "out2")


def test_dry_run_runs_every_step_and_writes_the_report(tmp_path):
    carry, _ = _carry(tmp_path)
    out = tmp_path / "report"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out),
                           "--carry", str(carry)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    report = json.loads((out / "gpu_check.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["install", "environment", "tiny_demo", "lora", "full", "qlora", "estimate", "export", "bench"]
    failed = {k: v.get("error") for k, v in steps.items() if v["status"] == "failed"}
    assert not failed and proc.returncode == 0, (failed, proc.stdout[-3000:], proc.stderr[-3000:])
    assert report["mode"] == "dry-run" and report["base_model"] == "builtin:tiny-llama-spm"
    assert steps["install"]["joined"] == ["llm_fake-0.1-py3-none-any.whl"]
    for job in ("tiny_demo", "lora", "full"):
        assert steps[job]["status"] == "ok" and steps[job]["decisions"]["device"] == "cpu"
        assert steps[job]["measured"]["steps"] == 2
    assert steps["lora"]["decisions"]["method"] == "lora" and steps["full"]["decisions"]["method"] == "full"
    assert steps["qlora"]["status"] == "skipped" and steps["qlora"]["reason"] == "skipped: bitsandbytes not carried"
    assert steps["qlora"]["bitsandbytes"] == {"mib": 70.0}
    for job in ("lora", "full"):
        row = steps["estimate"][job]
        assert row["estimated_peak_mb"] > 0 and row["measured_peak_rss_mb"] > 0
    assert isinstance(steps["export"]["verified"], bool) and Path(steps["export"]["gguf"]).stat().st_size > 0
    # The export without llama.cpp (the GPU machine may have none): the same converter, labelled unverified.
    unverified = gpu_check.unverified_gguf(str(Path(steps["lora"]["job_dir"]) / "final"), str(tmp_path / "unverified"))
    assert Path(unverified["gguf"]).name == "model.unverified.gguf" and Path(unverified["gguf"]).stat().st_size > 0
    bench = steps["bench"]
    assert bench["baseline"]["tokens_per_second"] > 0 and bench["llamafarm"]["tokens_per_second"] > 0
    assert bench["ratio"] > 0
    text = (out / "gpu_check.txt").read_text()
    assert text.startswith("GPU check (dry-run)") and all(f"\n{name:12} " in text for name in steps)
    # The dry run joins a carried model into its own folder, never into the machine's model cache.
    assert (out / "carried-model" / "llm_fake-0.1-py3-none-any.whl").exists()


def test_refuses_a_report_folder_that_is_not_empty(tmp_path):
    (tmp_path / "old.txt").write_text("ours")
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("Error:") and "Traceback" not in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["old.txt"]
