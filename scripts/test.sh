#!/usr/bin/env bash
# Run the test suite (README command 2):
#   bash scripts/test.sh [pytest args]
# Installs the environment first if needed; tests run offline on the builtin tiny models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Test-only dependencies (TRL, for the preference loss checks).
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements/test.txt
# LlamaFactory's own venv for the llamafactory backend's tests: built once per machine (about 2 min), then reused.
.venv/bin/python -m trainer.llamafactory.env
# The container runner's tests need a Docker-API engine and the CPU image (README, Runners).
if [ "$(uname -s)" = Linux ]; then bash scripts/container_setup.sh; fi
# The export tests render Ollama TEMPLATEs with Go's own text/template (tests/ollama_template/).
command -v go >/dev/null || bash scripts/apt_install.sh golang-go
# The torch.compile tests need the C++ compiler torch's CPU backend builds its kernels with.
command -v g++ >/dev/null || bash scripts/apt_install.sh g++
# The dashboard's browser tests drive Debian's headless chromium through its chromedriver.
command -v chromedriver >/dev/null || bash scripts/apt_install.sh chromium chromium-driver
# The linter first: errors that break code (pyproject.toml [tool.ruff]) fail the run in seconds.
.venv/bin/ruff check --quiet .
HF_HUB_OFFLINE=1 exec .venv/bin/python -m pytest "$@"
