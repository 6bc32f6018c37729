#!/usr/bin/env bash
# Create or update .venv with the pinned CPU environment and llamafarm itself:
#   bash scripts/install.sh
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# The CPU torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build.
# (This machine's pip config names local index folders that may be absent; hide that noise only.)
quiet_pip() { .venv/bin/pip "$@" --quiet --disable-pip-version-check 2> >(grep -v "^WARNING: Location" >&2); }
quiet_pip install -r requirements/cpu.txt
quiet_pip install -r requirements/export.txt
quiet_pip install -r requirements/ui.txt   # llamafarm ui, and Selenium for its browser tests
quiet_pip install --no-deps -e .
.venv/bin/python -c "import torch, transformers, peft, llama_cpp, starlette, uvicorn, orchestrator, trainer" \
  || { echo "install failed: see the pip output above" >&2; exit 1; }
