"""Our DPO, ORPO and KTO losses against TRL's own code for the same batch (fp32, within 1e-5).

TRL (a pinned test-only dependency, requirements/test.txt) computes its losses inside its trainers'
`_compute_loss` from per-token log-probs that its models return. Here both sides get the same
per-token log-probs from a small fake model (a seeded function of the token ids), so the comparison
is of the loss formulas alone: TRL's methods run on a stand-in `self` carrying only their settings.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

from trainer.preference import dpo_loss, kto_loss, orpo_loss  # noqa: E402

VOCAB, LENGTH, PAIRS = 50, 12, 4


class FakeLM(torch.nn.Module):
    """Per-token log-probs as TRL's fused LM head returns them: a seeded function of the ids, 0 outside answers."""

    def __init__(self, seed: int):
        super().__init__()
        self.w = torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed))
        self.is_gradient_checkpointing = False

    def token_logps(self, input_ids):
        pos = torch.arange(1, input_ids.shape[1], dtype=torch.float32)
        return -torch.nn.functional.softplus(self.w[input_ids[:, 1:]] + 0.1 * pos)

    def forward(self, input_ids, labels, **_):
        lp = self.token_logps(input_ids) * (labels[:, 1:] != -100)
        zeros = torch.zeros_like(lp)
        return SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), aux_loss=None)

    def sums(self, input_ids, completion_mask):
        """What our trainer computes: the answer tokens' log-probs summed, and their count."""
        mask = completion_mask[:, 1:].bool()
        return (self.token_logps(input_ids) * mask).sum(-1), mask.sum(-1)


def _batch(seed: int, rows: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, LENGTH), generator=g)
    prompt = torch.randint(2, 5, (rows,), generator=g)
    end = torch.randint(7, LENGTH + 1, (rows,), generator=g)
    pos = torch.arange(LENGTH)
    completion = ((pos >= prompt[:, None]) & (pos < end[:, None])).long()
    return ids, (pos < end[:, None]).long(), completion


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t, gather=lambda t: t,
                           unwrap_model=lambda m: m)


def _trainer_self(policy, ref, **settings):
    return SimpleNamespace(model=policy, ref_model=ref, accelerator=_accelerator(), aux_loss_enabled=False,
                           precompute_ref_logps=False, args=SimpleNamespace(gradient_checkpointing_kwargs=None),
                           _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                           _total_train_tokens=0, _tp_size=1, **settings)


@pytest.mark.parametrize("variant, beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1)])
def test_dpo_loss_equals_trl(variant, beta):
    from trl.trainer.dpo_trainer import DPOTrainer

    policy, ref = FakeLM(1), FakeLM(2)
    ids, attention, completion = _batch(0, 2 * PAIRS)  # TRL's order: all chosen, then all rejected
    stand_in = _trainer_self(policy, ref, beta=beta, ld_alpha=None, f_divergence_type="reverse_kl",
                             loss_types=[variant], loss_weights=[1.0], use_weighting=False, label_smoothing=0.0)
    theirs = DPOTrainer._compute_loss(stand_in, policy, {"input_ids": ids, "attention_mask": attention,
                                                         "completion_mask": completion}, False)
    logps, tokens = policy.sums(ids, completion)
    ref_logps, _ = ref.sums(ids, completion)
    n = PAIRS
    losses, chosen, rejected = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], beta, variant,
                                        tokens[:n], tokens[n:])
    assert abs(losses.mean().item() - theirs.item()) < 1e-5
    assert theirs.item() > 0.01  # not a trivially equal zero
    metrics = stand_in._metrics["train"]
    assert abs(chosen.mean().item() - metrics["rewards/chosen"][0]) < 1e-5
    assert abs(rejected.mean().item() - metrics["rewards/rejected"][0]) < 1e-5
    assert abs((chosen > rejected).float().mean().item() - metrics["rewards/accuracies"][0]) < 1e-6


def test_orpo_loss_equals_trl():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    policy = FakeLM(3)
    ids, _, completion = _batch(1, 2 * PAIRS)
    logps, tokens = policy.sums(ids, completion)
    means = logps / tokens
    nll = -logps[:PAIRS].sum() / tokens[:PAIRS].sum()
    beta = 0.2
    stand_in = SimpleNamespace(beta=beta, accelerator=_accelerator())
    losses, chosen_r, rejected_r, _, _ = ORPOTrainer.odds_ratio_loss(stand_in, means[:PAIRS], means[PAIRS:])
    theirs = nll - losses.mean()  # as ORPOTrainer.get_batch_loss_metrics combines them
    ours, chosen, rejected = orpo_loss(nll, means[:PAIRS], means[PAIRS:], beta)
    assert abs(ours.item() - theirs.item()) < 1e-5
    assert torch.allclose(chosen, chosen_r) and torch.allclose(rejected, rejected_r)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_loss_equals_trl(weights):
    from trl.trainer.kto_trainer import KTOTrainer

    policy, ref = FakeLM(4), FakeLM(5)
    ids, attention, completion = _batch(2, 6)
    kl_ids, kl_attention, kl_completion = _batch(3, 6)  # each prompt with another row's answer
    labels = torch.tensor([True, False, True, True, False, False])
    beta = 0.1
    stand_in = _trainer_self(policy, ref, beta=beta, calculate_KL=True, loss_type="kto",
                             desirable_weight=weights[0], undesirable_weight=weights[1])
    stand_in._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(stand_in, model, batch)
    theirs = KTOTrainer._compute_loss(stand_in, policy, {
        "input_ids": ids, "attention_mask": attention, "completion_mask": completion, "label": labels,
        "KL_input_ids": kl_ids, "KL_attention_mask": kl_attention, "KL_completion_mask": kl_completion}, False)
    logps, _ = policy.sums(ids, completion)
    ref_logps, _ = ref.sums(ids, completion)
    kl = (policy.sums(kl_ids, kl_completion)[0] - ref.sums(kl_ids, kl_completion)[0]).mean().clamp(min=0)
    assert kl.item() > 0  # the drift term takes part in this batch
    ours, _ = kto_loss(logps, ref_logps, labels.tolist(), kl, beta, *weights)
    assert abs(ours.item() - theirs.item()) < 1e-5
