"""The native runner (Apple MPS's runner, forced here with device cpu so it runs for real in CI):
its launch spec, the managed venv built from images/native-mps/requirements.txt, and tiny_demo run in it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from contract.job_folder import read_job
from orchestrator.runners import get_runner
from orchestrator.runners.local import PROJECT_ROOT
from orchestrator.runners.native import LOCK, ensure_venv, venv_dir, venv_python
from contract.plan import runner_of

QA = PROJECT_ROOT / "demos" / "datasets" / "medical_qa.jsonl"


def test_native_launch_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("VIRTUAL_ENV", "/somewhere/.venv")
    spec = get_runner("native").launch_spec(tmp_path / "job")
    assert spec.argv == [sys.executable, "-m", "orchestrator.runners.exit_watch", str(tmp_path / "job"), "--",
                         str(venv_dir() / "bin" / "python"), "-m", "trainer", "train", str(tmp_path / "job")]
    assert venv_dir().parent.name == "native-venv" and venv_dir().name.startswith(f"py{sys.version_info[0]}")
    assert spec.env["PYTHONPATH"].split(":")[0] == str(PROJECT_ROOT)
    assert spec.env["PYTHONNOUSERSITE"] == "1" and spec.env["PYTORCH_ENABLE_MPS_FALLBACK"] == "1"
    assert "VIRTUAL_ENV" not in spec.env
    assert spec.log_path == tmp_path / "job" / "train.log" and spec.cwd == PROJECT_ROOT


def test_venv_holds_exactly_the_lock():
    venv = ensure_venv()
    assert venv == venv_dir() and ensure_venv() == venv  # built once, then reused
    python = venv_python(venv)
    probe = ("import sys, torch, transformers; print(sys.prefix); print(torch.__version__.split('+')[0]); "
             "print(transformers.__version__)")
    prefix, torch_version, tf_version = subprocess.run([python, "-c", probe], capture_output=True, text=True,
                                                       check=True).stdout.split()
    assert Path(prefix) == venv  # its own site-packages, not the caller's environment
    pins = dict(line.split("==") for line in (PROJECT_ROOT / "requirements" / "cpu.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert (torch_version, tf_version) == (pins["torch"], pins["transformers"])
    assert LOCK.read_text().count("-r ../../requirements/cpu.txt") == 1


def test_tiny_demo_completes_in_the_native_venv(run_cli):
    result = run_cli("run", "--strategy", "tiny_demo", "--dataset", QA, "--runner", "native", "--set", "device=cpu",
                     "--set", "training_args.max_steps=4", "--set", "training_args.precision=fp32", "--foreground", "--json")
    assert result.exit_code == 0, result.output
    assert f"runner: native (--runner flag); venv {venv_dir()}" in result.output
    job_dir = Path(json.loads(result.stdout)["job_dir"])
    job = read_job(job_dir)
    assert (job["status"], runner_of(job)) == ("completed", "native")
    assert (job_dir / "final" / "model.safetensors").is_file()
    assert "device: cpu (set in the strategy)" in (job_dir / "train.log").read_text()


def test_half_precision_is_probed_on_the_device(monkeypatch):
    """MPS half-precision support varies with macOS and chip: bf16 or fp16 only when a training step
    on the device checks out. The probe itself runs here on the CPU, where both work."""
    import pytest

    from contract.errors import UserError
    from trainer import devices

    assert devices.probe_precision("cpu", "bf16")[0] is True
    ok, detail = devices.probe_precision("mps" if sys.platform != "darwin" else "meta", "bf16")
    assert ok is False and "Error" in detail  # no such device here: refused with the reason
    monkeypatch.setattr(devices, "probe_precision", lambda device, precision: (False, "gradients 40.0% off fp32"))
    with pytest.raises(UserError, match=r"precision bf16 is not reliable on MPS here: .* \(gradients 40.0% off fp32\); "
                                        "use fp32 or auto"):
        devices.choose_precision("bf16", "mps")
    monkeypatch.setattr(devices, "probe_precision", lambda device, precision: (True, "gradients within 0.39% of fp32"))
    decision = devices.choose_precision("fp16", "mps")
    assert (decision.value, decision.reason) == (
        "fp16", "set in the strategy; a fp16 training step checked out on this device (gradients within 0.39% of fp32)")
    assert devices.choose_precision("auto", "mps").value == "fp32"
