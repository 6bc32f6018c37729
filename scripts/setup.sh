#!/usr/bin/env bash
# Set everything up and run the main job on the embedded default (README command 1):
#   bash scripts/setup.sh
# Creates .venv with the pinned CPU environment, installs llamafarm into it, then fine-tunes the
# builtin tiny model on the bundled medical Q&A data and asks the result a question. No model download.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh
export HF_HUB_OFFLINE=1
LLAMAFARM=.venv/bin/llamafarm

"$LLAMAFARM" finetune strategies list
job_id=$("$LLAMAFARM" run --strategy tiny_demo --dataset demos/datasets/medical_qa.jsonl --json \
          | .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["job_id"])')
echo "job: $job_id"
"$LLAMAFARM" finetune monitor --job-id "$job_id" --follow
prompt="What are the symptoms of anemia?"
echo "Q: $prompt"
echo -n "A: "
"$LLAMAFARM" generate --model "$job_id" --prompt "$prompt"
# Export to an Ollama folder (q8_0 GGUF + Modelfile), verified against PyTorch with llama.cpp, and ask
# the GGUF the same question: the answer must match the one above.
export_dir=$("$LLAMAFARM" finetune export --model-path "$job_id" --format ollama --name tiny-medical --json \
             | .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["output"])')
echo "exported: $export_dir"
echo -n "A (GGUF, llama.cpp): "
"$LLAMAFARM" generate --model "$export_dir/model.gguf" --prompt "$prompt"
