"""Any Hugging Face causal-LM folder (a merged export, a downloaded model) is a model for `export`,
`generate` and `evaluate`; an Ollama export folder generates through its model.gguf."""

from __future__ import annotations

import json
import shutil

import pytest

from contract.errors import UserError
from orchestrator import jobs
from trainer.models.builtin import builtin_path
from inputs.models.plain_folder import folder_strategy

pytestmark = pytest.mark.slow  # trains, exports or evaluates real jobs


@pytest.fixture
def plain(tmp_path):
    folder = tmp_path / "downloaded-model"
    shutil.copytree(builtin_path("builtin:tiny-llama-bpe"), folder)
    return folder


def test_a_plain_folder_is_its_own_base_with_its_own_template(plain):
    strategy, text = folder_strategy(plain)
    cfg = strategy.cfg
    assert (cfg.base_model.huggingface_id, cfg.method.type, cfg.dataset.template) == (str(plain), "full", "auto")
    assert cfg.export.ollama.repeat_penalty == 1.1  # the schema's defaults for everything else
    assert str(plain) in text
    assert jobs.model_folder(str(plain)) == plain


def test_a_folder_that_is_no_causal_lm_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(UserError, match="neither a llamafarm model folder .* nor a Hugging Face causal-LM folder"):
        folder_strategy(tmp_path)
    with pytest.raises(UserError, match="holds no trained model"):
        jobs.model_folder(str(tmp_path))


def test_generate_answers_from_a_plain_folder(plain, run_cli):
    result = run_cli("generate", "--model", str(plain), "--prompt", "What is a fever?", "--max-new-tokens", "8",
                     "--greedy")
    assert result.exit_code == 0, result.output
