"""A previous job's output as a base model (job:<id> or a folder): references resolve to a plain model
folder, a LoRA output is merged into its base exactly, and bad references fail with one clear line."""

from __future__ import annotations

import pytest
import yaml

from contract.errors import UserError
from contract.job_folder import FINAL_DIR, write_json_atomic
from inputs.models.job_output import base_folder, final_folder
from orchestrator.runners.local import run_trainer

pytestmark = pytest.mark.slow  # trains, exports or evaluates real jobs

STRATEGY = {"fine_tuner": {"config": {
    "base_model": {"name": "bpe", "huggingface_id": "builtin:tiny-llama-bpe"},
    "method": {"type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "device": "cpu"}}}


def _job(home, job_id: str, status: str = "completed"):
    folder = home / "jobs" / job_id
    (folder / FINAL_DIR).mkdir(parents=True)
    write_json_atomic(folder / "job.json", {"job_id": job_id, "status": status})
    return folder


def test_references_that_are_not_job_outputs_pass_through(tmp_path):
    assert final_folder("builtin:tiny-llama-bpe") is None
    assert final_folder("meta-llama/Llama-3.2-3B") is None
    assert final_folder(str(tmp_path)) is None, "a folder without job.json or strategy.yaml is an ordinary model folder"


def test_bad_job_references_fail_clearly(_isolated_home):
    with pytest.raises(UserError, match="no job 'nope'"):
        final_folder("job:nope")
    _job(_isolated_home, "running-job", status="running")
    with pytest.raises(UserError, match="job running-job is running; only a completed job's output"):
        final_folder("job:running-job")
    _job(_isolated_home, "empty-job")
    with pytest.raises(UserError, match="holds no trained model"):
        final_folder("job:empty-job")


def test_lora_output_is_merged_into_its_base(_isolated_home):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.models.builtin import builtin_path

    base_dir = builtin_path("builtin:tiny-llama-bpe")
    folder = _job(_isolated_home, "stage1")
    final = folder / FINAL_DIR
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # a fresh adapter is a no-op; make this one change the output
    model.save_pretrained(final)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(final)
    (final / "strategy.yaml").write_text(yaml.safe_dump(STRATEGY))

    for reference in ("job:stage1", str(folder), str(final)):
        assert final_folder(reference) == final.resolve()
    def merge(final, target):  # as the CLI does it: the trainer's process folds the adapter in
        run_trainer("merge-base", str(final), str(target))

    merged = base_folder("job:stage1", merge, echo=lambda m: None)
    assert merged.parent.name == "merged" and (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    assert base_folder(str(final), merge, echo=lambda m: None) == merged, "merged once, then reused"

    ids = torch.tensor([[1, 50, 60, 70, 80]])
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)(ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(plain, expected, atol=1e-3), "the adapter must matter, or this test proves nothing"
