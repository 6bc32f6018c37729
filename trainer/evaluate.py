"""Evaluation of a trained model against its base on a dataset: loss, perplexity, sample answers.

    python -m trainer evaluate <folder> <dataset> --output result.json [--samples N] [--max-new-tokens N] [--greedy] [--seed N]

On preference data (pairs, or KTO's labelled answers) the loss is on the preferred answers, and each
model also gets its preference accuracy (the share of pairs whose chosen answer it finds more likely
than the rejected one) and margin (mean log p(chosen) - log p(rejected), nats). A dpo/orpo/kto job
gets its own stage's held-out metrics too (`preference`: loss, reward accuracy, reward margin), with
its base as the reference model, as training's eval_* metrics.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from pathlib import Path

_BATCH = 4


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


def _loss_scores(loss: float) -> dict:
    return {"loss": round(loss, 6), "perplexity": round(math.exp(min(loss, 50)), 4)}


def _scores(model, rows, pad_id: int) -> dict:
    from trainer.loop import evaluate_loss

    return _loss_scores(evaluate_loss(model, rows, _BATCH, pad_id, model.device.type, "fp32"))


def _pair_scores(model, pairs, pad_id: int) -> dict:
    """Loss and perplexity on the chosen answers; preference accuracy and margin over the pairs."""
    import torch

    from trainer.data.batching import collate
    from trainer.preference import sequence_logps

    chosen, rejected, tokens = [], [], []
    with torch.no_grad():
        for k in range(0, len(pairs), _BATCH):
            part = pairs[k : k + _BATCH]
            batch = collate([[p.chosen] for p in part] + [[p.rejected] for p in part], pad_id, block_mask=False)
            logps, counts = sequence_logps(model, batch, model.device.type, nullcontext())
            chosen += logps[: len(part)].tolist()
            rejected += logps[len(part) :].tolist()
            tokens += counts[: len(part)].tolist()
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {
        **_loss_scores(-sum(chosen) / max(sum(tokens), 1)),
        "preference_accuracy": round(sum(m > 0 for m in margins) / len(margins), 6),
        "preference_margin": round(sum(margins) / len(margins), 6),
    }


def _stage_metrics(model, cfg, items, encoder, pad_id: int, ref_model) -> dict:
    """The job's own objective on held-out items, its base as the reference: training's eval_* metrics."""
    from inputs.data.preference import as_stage_items
    from trainer.data.preference import encode_items
    from trainer.preference import PreferenceObjective

    encoded, _ = encode_items(encoder, as_stage_items(items, cfg.method.stage, "evaluate"))
    objective = PreferenceObjective(cfg.method.stage, cfg.method, pad_id, model.device.type, nullcontext, ref_model)
    metrics = objective.evaluate(model, encoded, _BATCH)
    return {"stage": cfg.method.stage, **{k.removeprefix("eval_"): v for k, v in metrics.items()}}


def evaluate(folder: Path, dataset: Path, samples: int = 3, max_new_tokens: int = 64, greedy: bool = False,
             seed: int | None = None) -> dict:
    from inputs.data.preference import Pair, read_eval_data
    from trainer.data.preference import encode_items
    from inputs.data.records import Conversation
    from trainer.generate import complete, load_for_inference
    from trainer.sampling import Sampling

    model, tokenizer, encoder, strategy = load_for_inference(Path(folder))
    cfg = strategy.cfg
    kind, items = read_eval_data(dataset, cfg)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if kind == "sft":
        conversations = items
        rows, stats = encoder.encode_all(conversations)
        count, truncated = len(rows), stats.truncated

        def score(m):
            return _scores(m, rows, pad)
    else:  # the preferred answers are the references: the chosen ones, or KTO's good ones
        good = [it for it in items if isinstance(it, Pair) or it.desirable]
        conversations = [Conversation((*it.prompt, {"role": "assistant", "content": it.chosen if kind == "pairs"
                                                    else it.completion}), it.where, kind) for it in good]
        if kind == "pairs":
            pairs, stats = encode_items(encoder, items)
        else:
            rows, stats = encoder.encode_all(conversations)
        count, truncated = len(pairs) if kind == "pairs" else len(rows), stats.truncated

        def score(m):
            return _pair_scores(m, pairs, pad) if kind == "pairs" else _scores(m, rows, pad)
    chats = [c for c in conversations if c.text is None][:samples]
    # Both models answer with the Modelfile's sampling and the same seed, as Ollama would.
    sampling = Sampling.from_spec(cfg.export.ollama, greedy, seed)
    tuned = score(model)
    tuned_answers = [complete(model, tokenizer, encoder, list(c.messages[:-1]), max_new_tokens, sampling) for c in chats]
    with _base_view(model, cfg) as base:
        base_scores = score(base)
        base_answers = [complete(base, tokenizer, encoder, list(c.messages[:-1]), max_new_tokens, sampling) for c in chats]
        ref = None if base is model else base  # LoRA: the objective switches the adapter off itself
    stage = _stage_metrics(model, cfg, items, encoder, pad, ref) if kind != "sft" and cfg.method.stage != "sft" else None
    result = {
        "model": str(folder),
        "dataset": str(dataset),
        "data": kind,
        "rows": count,
        "truncated": truncated,
        "sampling": sampling.describe(),
        "fine_tuned": tuned,
        "base": base_scores,
        "samples": [
            {"prompt": c.messages[-2]["content"], "reference": c.messages[-1]["content"], "base": b, "fine_tuned": t}
            for c, b, t in zip(chats, base_answers, tuned_answers)
        ],
    }
    if stage is not None:
        result["preference"] = stage
    return result
