"""The distillation objectives added for issue 21 (Sinkhorn / BD-KD / PLD) and the split HASS switches."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from specrec.training import drafter as dr
from specrec.training.drafter import (
    DIVERGENCES,
    OBJECTIVES,
    PLAIN,
    RANKING_LOSSES,
    DistillLoss,
    TrainSpec,
    bdkd,
    divergence,
    drafter_profile,
    pld,
    position_loss,
    sinkhorn,
    top_k_loss,
)

NEW = ("sinkhorn", "bdkd", "pld")
V = 12


def masked_logp(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.masked_fill(~allowed, -math.inf), -1)


def batch(seed: int = 0, rows: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """allowed [rows, V] (2..V allowed per row, several rows mostly masked), target log p, drafter logits."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.rand(rows, V, generator=g) < 0.5
    allowed[:, :2] = True
    allowed[0] = False
    allowed[0, [3, 7]] = True  # a row with two allowed tokens only
    lp = masked_logp(2 * torch.randn(rows, V, generator=g), allowed)
    logits = 2 * torch.randn(rows, V, generator=g)
    return allowed, lp, logits


def test_divergence_list():
    assert {"sinkhorn", "bdkd"} <= set(DIVERGENCES) and RANKING_LOSSES == ("pld",)
    assert set(NEW) <= set(OBJECTIVES)
    import argparse

    from specrec.drafting.commands import register  # the CLI offers every objective
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train-drafter", "--divergence", "pld", "--no-hass-objective"])
    assert args.divergence == "pld" and args.no_hass_objective and not args.no_hass_alignment


@pytest.mark.parametrize("kind", NEW)
def test_nonnegative_finite_and_finite_gradients(kind):
    allowed, lp, logits = batch()
    logits.requires_grad_(True)
    d = divergence(kind, lp, masked_logp(logits, allowed), allowed)
    assert d.shape == (allowed.shape[0],)
    assert torch.isfinite(d).all() and (d >= -1e-6).all()
    d.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[~allowed].abs().max() == 0  # masked logits get no gradient
    assert logits.grad[allowed].abs().sum() > 0


@pytest.mark.parametrize("kind", ("sinkhorn", "bdkd"))
def test_zero_at_q_equals_p_and_larger_elsewhere(kind):
    allowed, lp, logits = batch(1)
    assert torch.allclose(divergence(kind, lp, lp, allowed), torch.zeros(len(lp)), atol=1e-6)
    d = divergence(kind, lp, masked_logp(logits, allowed), allowed)
    assert (d > 1e-3).all()


@pytest.mark.parametrize("kind", NEW)
def test_masked_tokens_are_ignored(kind):
    """Whatever a masked entry of log q (or log p) holds, the value and the gradient are the same."""
    allowed, lp, logits = batch(2)
    lq = masked_logp(logits, allowed)
    junk = torch.randn(lq.shape) * 5
    lq2 = torch.where(allowed, lq, junk)
    lp2 = torch.where(allowed, lp, -junk)
    assert torch.allclose(divergence(kind, lp, lq, allowed), divergence(kind, lp2, lq2, allowed), atol=1e-6)
    # changing a masked logit changes nothing
    logits2 = logits.clone()
    logits2[~allowed] += 100.0
    assert torch.equal(divergence(kind, lp, masked_logp(logits2, allowed), allowed),
                       divergence(kind, lp, lq, allowed))


def test_sinkhorn_tends_to_tvd_as_eps_shrinks():
    """The docstring's claim: with the 0/1 cost the exact OT distance is TVD; the entropic one approaches it."""
    allowed, lp, logits = batch(3)
    lq = masked_logp(logits, allowed)
    tvd = divergence("tvd", lp, lq, allowed)
    errs = [(sinkhorn(lp, lq, allowed, eps=eps, iters=2000) - tvd).abs().max().item() for eps in (0.3, 0.05, 0.005)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.01
    # the entropic smoothing only lowers it (the debiased divergence is below the exact one here)
    assert (sinkhorn(lp, lq, allowed) <= tvd + 1e-5).all()


def test_bdkd_by_hand_on_three_tokens():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    q = torch.tensor([[0.3, 0.3, 0.4]])
    allowed = torch.ones(1, 3, dtype=torch.bool)
    hp = -sum(x * math.log(x) for x in (0.7, 0.2, 0.1))
    hq = -sum(x * math.log(x) for x in (0.3, 0.3, 0.4))
    fkl = sum(a * math.log(a / b) for a, b in zip((0.7, 0.2, 0.1), (0.3, 0.3, 0.4), strict=True))
    rkl = sum(b * math.log(b / a) for a, b in zip((0.7, 0.2, 0.1), (0.3, 0.3, 0.4), strict=True))
    expected = hq / (hp + hq) * fkl + hp / (hp + hq) * rkl
    assert bdkd(p.log(), q.log(), allowed).item() == pytest.approx(expected, rel=1e-5)
    # the weights are detached: the gradient is that of the weighted sum with constant weights
    lq = q.log().requires_grad_(True)
    bdkd(p.log(), lq, allowed).sum().backward()
    lq2 = q.log().requires_grad_(True)
    w = hq / (hp + hq)
    (w * divergence("fkl", p.log(), lq2, allowed) + (1 - w) * divergence("rkl", p.log(), lq2, allowed)).sum().backward()
    assert torch.allclose(lq.grad, lq2.grad, atol=1e-6)


def test_pld_prefers_the_teachers_order():
    allowed = torch.ones(1, V, dtype=torch.bool)
    allowed[0, -3:] = False
    lp = masked_logp(torch.linspace(3, -3, V)[None], allowed)  # teacher order: 0, 1, 2, ...
    same = masked_logp(torch.linspace(1, -1, V)[None], allowed)
    reversed_ = masked_logp(torch.linspace(-1, 1, V)[None], allowed)
    assert pld(lp, same, allowed).item() < pld(lp, reversed_, allowed).item()
    # by hand on K = 3 (the allowed count caps K)
    small = torch.zeros(1, V, dtype=torch.bool)
    small[0, [2, 5, 9]] = True
    lp3 = masked_logp(torch.tensor([[0.0] * V]).index_put_((torch.tensor([0, 0, 0]), torch.tensor([2, 5, 9])),
                                                           torch.tensor([1.0, 3.0, 2.0])), small)  # order 5, 9, 2
    s = {2: math.log(0.2), 5: math.log(0.5), 9: math.log(0.3)}
    lq3 = torch.full((1, V), -math.inf)
    for t, v in s.items():
        lq3[0, t] = v
    by_hand = (-s[5] + math.log(0.2 + 0.5 + 0.3)) + (-s[9] + math.log(0.3 + 0.2)) + 0.0
    assert pld(lp3, lq3, small).item() == pytest.approx(by_hand, rel=1e-5)


def test_pld_caps_k_at_the_allowed_count():
    allowed, lp, logits = batch(4)
    lq = masked_logp(logits, allowed)
    assert torch.allclose(pld(lp, lq, allowed, k=V), pld(lp, lq, allowed, k=100))
    assert (pld(lp, lq, allowed, k=1) == 0).all()  # one item: nothing to order


# -- the split HASS switches ------------------------------------------------------------------------

def test_position_loss_adds_top_k_only_with_the_objective_switch():
    prof = drafter_profile("tiny")
    allowed, lp, logits = batch(5)
    lq = masked_logp(logits, allowed)
    base = divergence("fkl", lp, lq, allowed).sum()
    top = prof.top_k_weight * top_k_loss(lp, lq, prof.top_k).sum()
    for objective in (True, False):
        for alignment in (True, False):
            spec = TrainSpec(hass_objective=objective, hass_alignment=alignment)
            loss, n = position_loss(spec, prof, logits, lp)
            assert n == len(lp)
            assert loss.item() == pytest.approx((base + top if objective else base).item(), rel=1e-5), spec


class _FakeLoss(DistillLoss):
    """DistillLoss with the model forward replaced: records which parts run and what spec they see."""

    def __init__(self, spec: TrainSpec):
        prof = drafter_profile("tiny")
        data = SimpleNamespace(sequences=[[0]] * 4)
        model = SimpleNamespace(config=SimpleNamespace(vocab=SimpleNamespace(size=V)))
        super().__init__(model, None, data, None, spec, prof)
        self.calls: list[str] = []

    def _rows(self, what: str) -> tuple[torch.Tensor, int]:
        self.calls.append(what)
        _, lp, logits = batch(6)
        return position_loss(self.spec, self.prof, logits, lp)

    def teacher_forced(self, picks):
        return self._rows("teacher_forced")

    def unrolled(self, picks, rng):
        return self._rows("unrolled")


@pytest.mark.parametrize("objective,alignment", [(True, True), (False, True), (True, False), (False, False)])
def test_distill_loss_switches_are_independent(monkeypatch, objective, alignment):
    top_k_calls = []
    real = dr.top_k_loss
    monkeypatch.setattr(dr, "top_k_loss", lambda *a: top_k_calls.append(1) or real(*a))
    fake = _FakeLoss(TrainSpec(hass_objective=objective, hass_alignment=alignment))
    loss = fake(np.random.default_rng(0))
    assert torch.isfinite(loss)
    assert ("unrolled" in fake.calls) == alignment
    assert bool(top_k_calls) == objective
    if objective:
        assert len(top_k_calls) == len(fake.calls)  # the top-K loss at teacher-forced and unrolled positions alike


def test_variant_names():
    assert TrainSpec().variant == "drafter"
    assert TrainSpec(hass=False).variant == "drafter-no-hass"
    assert TrainSpec(hass_objective=False, hass_alignment=False).variant == "drafter-no-hass"
    assert TrainSpec(hass_objective=False).variant == "drafter-no-hass-objective"
    assert TrainSpec(hass_alignment=False).variant == "drafter-no-hass-alignment"
    assert PLAIN.variant == "drafter-no-slot-no-step-no-hass"
    assert TrainSpec("sinkhorn", use_step=False).variant == "drafter-sinkhorn-no-step"
    with pytest.raises(ValueError, match="unknown divergence"):
        TrainSpec("nope")


