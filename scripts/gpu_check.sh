#!/usr/bin/env bash
# The GPU check (docs/GPU.md): every CUDA path through the real CLI, one JSON and a text report.
#   bash scripts/gpu_check.sh --out DIR [--carry .gpu-carry] [--dry-run]
# Prepare the carry here first: .venv/bin/python -m bench.gpu_carry (one bundle per device call).
# On the GPU machine there is no .venv: the system Python (3.12, torch) runs it, with the carried
# wheels installed into DIR/site-packages. Exit 0: no step failed; 2: some step failed (see the report).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=${PYTHON:-python3}; fi
exec "$PYTHON" -m bench.gpu_check "$@"
