"""Markers say what a test needs beyond Python, so a machine without it can leave those tests out."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_engine_tests_carry_the_container_marker():
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "not container",
                          "tests/test_container_runner.py"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "test_cpu_launch_spec" in out, "a launch spec needs no engine"
    assert "test_tiny_demo_runs_in_the_cpu_image" not in out and "deselected" in out, out
