"""Evaluation of a trained model against its base on a dataset: loss, perplexity, sample answers.

    python -m trainer evaluate <folder> <dataset> --output result.json [--samples N] [--max-new-tokens N] [--greedy] [--seed N]
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def _base_view(model, cfg):
    """The base model: the same weights with the LoRA adapter switched off, or a fresh load for full."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        from trainer.generate import load_base

        base = load_base(cfg).to(model.device)
        base.eval()
        yield base


def _scores(model, rows, pad_id: int) -> dict:
    from trainer.loop import evaluate_loss

    loss = evaluate_loss(model, rows, 4, pad_id, model.device.type, "fp32")
    return {"loss": round(loss, 6), "perplexity": round(math.exp(min(loss, 50)), 4)}


def evaluate(folder: Path, dataset: Path, samples: int = 3, max_new_tokens: int = 64, greedy: bool = False,
             seed: int | None = None) -> dict:
    from trainer.data.records import read_dataset
    from trainer.generate import complete, load_for_inference
    from trainer.sampling import Sampling

    model, tokenizer, encoder, strategy = load_for_inference(Path(folder))
    cfg = strategy.cfg
    if cfg.method.stage == "sft":
        conversations = read_dataset(dataset, cfg.dataset.format, cfg.dataset.columns, cfg.dataset.replace)
    else:  # a preference job is scored on its data's preferred answers (the chosen ones, or KTO's own)
        from trainer.data.preference import read_for_stage

        conversations = read_for_stage(dataset, cfg)[::2]
    rows, stats = encoder.encode_all(conversations)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chats = [c for c in conversations if c.text is None][:samples]
    # Both models answer with the Modelfile's sampling and the same seed, as Ollama would.
    sampling = Sampling.from_spec(cfg.export.ollama, greedy, seed)
    tuned = _scores(model, rows, pad)
    tuned_answers = [complete(model, tokenizer, encoder, list(c.messages[:-1]), max_new_tokens, sampling) for c in chats]
    with _base_view(model, cfg) as base:
        base_scores = _scores(base, rows, pad)
        base_answers = [complete(base, tokenizer, encoder, list(c.messages[:-1]), max_new_tokens, sampling) for c in chats]
    return {
        "model": str(folder),
        "dataset": str(dataset),
        "rows": len(rows),
        "truncated": stats.truncated,
        "sampling": sampling.describe(),
        "fine_tuned": tuned,
        "base": base_scores,
        "samples": [
            {"prompt": c.messages[-2]["content"], "reference": c.messages[-1]["content"], "base": b, "fine_tuned": t}
            for c, b, t in zip(chats, base_answers, tuned_answers)
        ],
    }
