"""Preference tuning (method.stage dpo, orpo, kto): the losses and the objective the training loop runs.

The losses are small functions of per-sequence log-probabilities, checked against TRL's own code
(tests/test_preference_losses.py). The reference model is the base: with LoRA the same model with its
adapter switched off (no second copy in memory), with full fine-tuning a frozen copy made before
training. Pairs are never packed: a chosen and a rejected answer are separate, padded rows, so neither
can attend to the other.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from trainer.data.batching import collate
from trainer.data.tokenize import IGNORE_INDEX

# --- losses (tensors of shape (batch,)) ----------------------------------------------------------


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float, variant: str = "sigmoid",
             chosen_tokens=None, rejected_tokens=None):
    """Per-pair DPO loss and the implicit rewards beta * (log pi - log pi_ref) of both answers.

    sigmoid: -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)), the DPO paper's loss.
    ipo: (difference of the token-averaged log-ratios - 1 / (2 beta))^2, IPO with TRL's length average."""
    import torch.nn.functional as F

    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if variant == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif variant == "ipo":
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown dpo_loss {variant!r}; valid: sigmoid, ipo")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def orpo_loss(chosen_nll, chosen_mean_logps, rejected_mean_logps, beta: float):
    """ORPO: the chosen answer's NLL minus beta * mean log sigmoid(log odds ratio); no reference model.

    The log-probs are token means; log odds(p) = log p - log(1 - p). Returns (loss, rewards chosen, rejected)."""
    import torch
    import torch.nn.functional as F

    chosen, rejected = chosen_mean_logps.float(), rejected_mean_logps.float()
    # log(1 - exp(x)) for x < 0, accurate at both ends
    log1mexp = lambda x: torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))  # noqa: E731
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    loss = chosen_nll - (beta * F.logsigmoid(log_odds)).mean()
    return loss, beta * chosen.detach(), beta * rejected.detach()


def kto_loss(logps, ref_logps, desirable, kl, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0):
    """KTO: good answers pushed above, bad ones below, the policy's drift `kl` (a detached estimate).

    Returns (mean loss over the rows, rewards beta * log-ratio per row)."""
    import torch

    ratio = logps - ref_logps
    good = torch.as_tensor(desirable, dtype=torch.bool, device=logps.device)
    losses = torch.where(good, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    return losses.mean(), beta * ratio.detach()


# --- the objective -------------------------------------------------------------------------------


def sequence_logps(model, batch, device: str, autocast, chunked: bool = False):
    """(sum of the answer tokens' log-probs, number of answer tokens) for every row of a batch; `chunked`:
    through trainer/chunked_loss.py's head over answer positions only (no full logits)."""
    import torch

    if chunked:
        from trainer.chunked_loss import answer_log_probs

        with autocast:
            return answer_log_probs(model, batch.input_ids.to(device), batch.attention_mask.to(device),
                                    batch.position_ids.to(device), batch.labels.to(device), IGNORE_INDEX)
    with autocast:
        logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                       position_ids=batch.position_ids.to(device)).logits
    logits = logits[:, :-1].float()
    labels = batch.labels[:, 1:].to(device)
    mask = labels != IGNORE_INDEX
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_logps = (picked - torch.logsumexp(logits, dim=-1)) * mask
    return token_logps.sum(-1), mask.sum(-1)


@dataclass
class PreferenceObjective:
    """What the training loop needs from a stage: batches, a loss with its metrics, and eval."""

    stage: str
    method: object  # contract.strategy.MethodSpec
    pad_id: int
    device: str
    autocast: object  # () -> context manager
    ref_model: object = None  # full fine-tuning's frozen copy; None: LoRA's adapter is switched off
    chunked: bool = False  # log-probabilities through the chunked head (the chunked_loss decision)
    block_mask: bool = False  # contract/decisions.py block_mask (pairs are never packed: our CPU kernels)

    def units(self, batch) -> int:
        """Pairs (or KTO rows) in a micro-batch: the loss is their mean, accumulation weighs by them."""
        return batch.items

    def collate(self, items):
        if self.stage == "kto":
            rows = [[it.row] for it in items] + [[it.mismatched] for it in items]
        else:
            rows = [[it.chosen] for it in items] + [[it.rejected] for it in items]
        batch = collate(rows, self.pad_id, self.block_mask)
        batch.items = len(items)
        batch.desirable = [it.desirable for it in items] if self.stage == "kto" else None
        return batch

    @contextmanager
    def _reference(self, model):
        import torch

        with torch.no_grad():
            if self.ref_model is not None:
                yield self.ref_model
            else:
                with model.disable_adapter():
                    yield model

    def _logps(self, model, batch):
        return sequence_logps(model, batch, self.device, self.autocast(), self.chunked)

    def loss(self, model, batch):
        """(loss tensor, metrics as name -> (sum, count)) for one micro-batch."""
        return {"dpo": self._dpo, "orpo": self._orpo, "kto": self._kto}[self.stage](model, batch)

    def _dpo(self, model, batch):
        n = batch.items
        logps, tokens = self._logps(model, batch)
        with self._reference(model) as ref:
            ref_logps, _ = self._logps(ref, batch)
        losses, chosen, rejected = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], self.method.beta,
                                            self.method.dpo_loss, tokens[:n], tokens[n:])
        return losses.mean(), _pair_metrics(losses.detach(), chosen, rejected)

    def _orpo(self, model, batch):
        n = batch.items
        logps, tokens = self._logps(model, batch)
        mean_logps = logps / tokens.clamp(min=1)
        nll = -logps[:n].sum() / tokens[:n].sum().clamp(min=1)  # per answer token, as SFT
        loss, chosen, rejected = orpo_loss(nll, mean_logps[:n], mean_logps[n:], self.method.beta)
        metrics = _pair_metrics(None, chosen, rejected)
        metrics["loss"] = (loss.item() * n, n)
        metrics["nll_loss"] = (nll.item() * n, n)
        return loss, metrics

    def _kto(self, model, batch):
        import torch

        n = batch.items
        logps, _ = self._logps(model, _rows(batch, 0, n))
        with torch.no_grad():
            kl_logps, _ = self._logps(model, _rows(batch, n, 2 * n))
        with self._reference(model) as ref:
            ref_logps, _ = self._logps(ref, batch)
        kl = (kl_logps - ref_logps[n:]).mean().clamp(min=0)
        m = self.method
        loss, rewards = kto_loss(logps, ref_logps[:n], batch.desirable, kl, m.beta, m.kto_desirable_weight,
                                 m.kto_undesirable_weight)
        good = torch.tensor(batch.desirable)
        right = ((rewards > 0) == good).float()
        return loss, {
            "loss": (loss.item() * n, n),
            "rewards_chosen": (rewards[good].sum().item(), int(good.sum())),
            "rewards_rejected": (rewards[~good].sum().item(), int((~good).sum())),
            "reward_accuracy": (right.sum().item(), n),
            "kl": (kl.item() * n, n),
        }

    def evaluate(self, model, items, batch_size: int) -> dict:
        """Held-out loss and preference metrics, as eval_* keys."""
        import torch

        was_training = model.training
        model.eval()
        totals: dict[str, list[float]] = {}
        with torch.no_grad():
            for k in range(0, len(items), batch_size):
                _, metrics = self.loss(model, self.collate(items[k : k + batch_size]))
                add_metrics(totals, metrics)
        model.train(was_training)
        return {f"eval_{name}": value for name, value in mean_metrics(totals).items()}


def _rows(batch, start: int, stop: int):
    """Rows start:stop of a padded batch, as a batch."""
    from trainer.data.batching import Batch

    def part(t):
        return t[start:stop]

    return Batch(part(batch.input_ids), part(batch.labels), part(batch.attention_mask), part(batch.position_ids),
                 0, 0, 0)


def _pair_metrics(losses, chosen, rejected) -> dict:
    n = len(chosen)
    margin = chosen - rejected
    metrics = {
        "rewards_chosen": (chosen.sum().item(), n),
        "rewards_rejected": (rejected.sum().item(), n),
        "reward_margin": (margin.sum().item(), n),
        "reward_accuracy": ((margin > 0).float().sum().item(), n),
    }
    if losses is not None:
        metrics["loss"] = (losses.sum().item(), n)
    return metrics


def add_metrics(totals: dict, metrics: dict) -> None:
    for name, (value, count) in metrics.items():
        total = totals.setdefault(name, [0.0, 0])
        total[0] += value
        total[1] += count


def mean_metrics(totals: dict) -> dict:
    return {name: round(value / count, 6) for name, (value, count) in totals.items() if count}
