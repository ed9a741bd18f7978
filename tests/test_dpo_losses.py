"""DPO / IPO / hinge / robust / cDPO / RPO and KTO losses (losses.py, "preference optimisation"), worked on paper:
values and gradients on one or two pairs, ties, per-pair weights, micro-batch invariance, and autograd's numeric
gradient check. Numbers: σ(1) = 0.731059, σ(−1) = 0.268941, −log σ(1) = 0.313262, −log σ(−1) = 1.313262."""

import math

import pytest
import torch

from chatrlhf import losses

T = torch.tensor
LS1, LSM1 = 0.313262, 1.313262       # −log σ(1), −log σ(−1)
S1, SM1 = 0.731059, 0.268941         # σ(1), σ(−1)


def pair(chosen=-1.0, rejected=-3.0, ref_chosen=-2.0, ref_rejected=-2.0):
    """One pair: chosen log-ratio +1, rejected log-ratio −1 by default, so Δ = 2. Leaves with gradients."""
    c, r = T([chosen], requires_grad=True), T([rejected], requires_grad=True)
    return c, r, T([ref_chosen]), T([ref_rejected])


def value_and_grads(tie=False, **kw):
    c, r, rc, rr = pair()
    loss, m = losses.dpo_loss(c, r, rc, rr, tie=T([tie]), chosen_tokens=T([2.0]), rejected_tokens=T([4.0]), **kw)
    loss.backward()
    return float(loss.detach()), float(c.grad), float(r.grad), m


def test_sigmoid_dpo_value_and_gradient():
    # β = 0.5, Δ = 2 → x = 1: loss −log σ(1); ∂/∂log π(chosen) = −β σ(−x) = −0.5 · 0.268941
    loss, gc, gr, m = value_and_grads(beta=0.5)
    assert loss == pytest.approx(LS1, abs=1e-5)
    assert gc == pytest.approx(-0.5 * SM1, abs=1e-5) and gr == pytest.approx(0.5 * SM1, abs=1e-5)
    # rewards = β·log-ratio: chosen +0.5, rejected −0.5, margin 1, right
    assert float(m["rewards/chosen"]) == 0.5 and float(m["rewards/rejected"]) == -0.5
    assert float(m["rewards/margins"]) == 1.0 and float(m["rewards/accuracies"]) == 1.0
    assert float(m["logps/chosen"]) == -1.0 and float(m["logps/rejected"]) == -3.0


def test_cdpo_label_smoothing_value_and_gradient():
    # ε = 0.1: 0.9 · 0.313262 + 0.1 · 1.313262 = 0.413262; ∂/∂x = −0.9 σ(−1) + 0.1 σ(1) = −0.168941, × β
    loss, gc, _, _ = value_and_grads(beta=0.5, label_smoothing=0.1)
    assert loss == pytest.approx(0.413262, abs=1e-5)
    assert gc == pytest.approx(0.5 * (-0.9 * SM1 + 0.1 * S1), abs=1e-5)
    # TRL ≤ 0.11's sigmoid with label smoothing, written out: the same number
    x = torch.tensor(1.0)
    trl = -torch.nn.functional.logsigmoid(x) * 0.9 - torch.nn.functional.logsigmoid(-x) * 0.1
    assert loss == pytest.approx(float(trl), abs=1e-6)


def test_robust_dpo_value_and_gradient():
    # (0.9 · 0.313262 − 0.1 · 1.313262) / 0.8 = 0.188260; ∂/∂x = (−0.9 σ(−1) − 0.1 σ(1)) / 0.8 = −0.393941, × β
    loss, gc, _, _ = value_and_grads(beta=0.5, label_smoothing=0.1, loss_type="robust")
    assert loss == pytest.approx(0.188260, abs=1e-5)
    assert gc == pytest.approx(0.5 * -0.393941, abs=1e-5)
    # ε = 0: plain DPO
    assert value_and_grads(beta=0.5, loss_type="robust")[0] == pytest.approx(LS1, abs=1e-5)


def test_hinge_value_and_gradient():
    # β = 0.25 → x = 0.5: max(0, 1 − 0.5) = 0.5, ∂/∂log π(chosen) = −β
    loss, gc, gr, _ = value_and_grads(beta=0.25, loss_type="hinge")
    assert loss == pytest.approx(0.5) and gc == pytest.approx(-0.25) and gr == pytest.approx(0.25)
    # β = 1 → x = 2: past the margin, no loss and no gradient
    loss, gc, _, _ = value_and_grads(beta=1.0, loss_type="hinge")
    assert loss == 0.0 and gc == 0.0


def test_ipo_value_and_gradient_use_per_token_log_ratios():
    # chosen ratio +1 over 2 tokens = 0.5, rejected −1 over 4 tokens = −0.25 → h = 0.75; β = 0.5 → target 1/(2β) = 1
    # loss (0.75 − 1)² = 0.0625; ∂/∂log π(chosen) = 2(h − 1)/2 = −0.25; ∂/∂log π(rejected) = 2(h − 1)(−1/4) = 0.125
    loss, gc, gr, _ = value_and_grads(beta=0.5, loss_type="ipo")
    assert loss == pytest.approx(0.0625) and gc == pytest.approx(-0.25) and gr == pytest.approx(0.125)


@pytest.mark.parametrize("loss_type, beta, want, want_grad", [
    ("sigmoid", 0.5, (LS1 + LSM1) / 2, 0.5 * (S1 - SM1) / 2),   # the 50/50 Bradley–Terry outcome at x = 1
    ("robust", 0.5, (LS1 + LSM1) / 2, 0.5 * (S1 - SM1) / 2),    # the same: ε means nothing for a tie
    ("hinge", 0.25, 1.0, 0.0),                                   # x = 0.5 inside the band |x| ≤ 1: flat
    ("hinge", 1.5, 2.0, 0.75),                                   # x = 3: ½(0 + 4), pushed back, ½·β
    ("ipo", 0.5, 0.5625, 0.75),                                  # h = 0.75, target 0: h², ∂ = 2h/2
])
def test_a_tie_pulls_the_two_replies_together(loss_type, beta, want, want_grad):
    loss, gc, _, m = value_and_grads(tie=True, beta=beta, loss_type=loss_type, label_smoothing=0.1)
    assert loss == pytest.approx(want, abs=1e-5) and gc == pytest.approx(want_grad, abs=1e-5)
    assert float(m["rewards/accuracies"]) == 0.0  # no decided pair: accuracy counts none


def test_rpo_adds_the_chosen_nll_per_token_on_decided_pairs_only():
    # α = 0.5, log π(chosen) = −1 over 2 tokens: NLL 0.5 → + 0.25; ∂ gains α · (−1/2) = −0.25
    loss, gc, gr, m = value_and_grads(beta=0.5, rpo_alpha=0.5)
    assert loss == pytest.approx(LS1 + 0.25, abs=1e-5) and float(m["loss/nll"]) == pytest.approx(0.5)
    assert gc == pytest.approx(-0.5 * SM1 - 0.25, abs=1e-5) and gr == pytest.approx(0.5 * SM1, abs=1e-5)
    loss, _, _, m = value_and_grads(tie=True, beta=0.5, rpo_alpha=0.5)   # a tie (or both-bad): nothing to imitate
    assert loss == pytest.approx((LS1 + LSM1) / 2, abs=1e-5) and float(m["loss/nll"]) == 0.0


def two_pairs():
    # pair A: Δ = +2, pair B: Δ = −2 (the policy prefers the rejected reply); β = 0.5 → x = ±1
    c, r = T([-1.0, -3.0], requires_grad=True), T([-3.0, -1.0], requires_grad=True)
    return c, r, T([-2.0, -2.0]), T([-2.0, -2.0])


def test_per_pair_weights_give_a_weighted_mean():
    c, r, rc, rr = two_pairs()
    loss, m = losses.dpo_loss(c, r, rc, rr, beta=0.5, weight=T([3.0, 1.0]))
    assert float(loss.detach()) == pytest.approx((3 * LS1 + LSM1) / 4, abs=1e-5)  # 0.563262
    assert float(m["rewards/accuracies"]) == 0.5 and float(m["rewards/margins"]) == 0.0
    loss.backward()
    assert float(c.grad[0]) == pytest.approx(-3 / 4 * 0.5 * SM1, abs=1e-5)
    assert float(c.grad[1]) == pytest.approx(-1 / 4 * 0.5 * S1, abs=1e-5)


def test_accuracy_counts_decided_pairs_and_an_exact_tie_of_rewards_as_half():
    # rewards margins: +1 (right), −1 (wrong), 0 (the untrained policy: half), and a tie pair that is not counted
    c, r = T([-1.0, -3.0, -2.0, -1.0]), T([-3.0, -1.0, -2.0, -3.0])
    ref = T([-2.0, -2.0, -2.0, -2.0])
    _, m = losses.dpo_loss(c, r, ref, ref, beta=0.5, tie=T([False, False, False, True]))
    assert float(m["rewards/accuracies"]) == pytest.approx(1.5 / 3)


def test_micro_batches_with_the_step_weight_equal_one_big_batch():
    c, r, rc, rr = two_pairs()
    w = T([3.0, 1.0])
    whole, _ = losses.dpo_loss(c, r, rc, rr, beta=0.5, weight=w, rpo_alpha=0.3, chosen_tokens=T([2.0, 5.0]))
    parts = sum(losses.dpo_loss(c[i:i + 1], r[i:i + 1], rc[i:i + 1], rr[i:i + 1], beta=0.5, weight=w[i:i + 1],
                                total_weight=w.sum(), rpo_alpha=0.3, chosen_tokens=T([2.0, 5.0])[i:i + 1])[0]
                for i in range(2))
    assert float(parts.detach()) == pytest.approx(float(whole.detach()), abs=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo"])
def test_gradients_match_finite_differences(loss_type):
    g = torch.Generator().manual_seed(0)
    c = (-torch.rand(4, generator=g, dtype=torch.float64) * 5).requires_grad_()
    r = (-torch.rand(4, generator=g, dtype=torch.float64) * 5).requires_grad_()
    rc, rr = -torch.rand(4, generator=g, dtype=torch.float64) * 5, -torch.rand(4, generator=g, dtype=torch.float64) * 5
    tie, w = T([False, True, False, False]), torch.tensor([1.0, 0.5, 2.0, 1.0], dtype=torch.float64)
    tokens = torch.tensor([3.0, 5.0, 2.0, 7.0], dtype=torch.float64)
    fn = lambda a, b: losses.dpo_loss(a, b, rc, rr, beta=0.3, loss_type=loss_type, label_smoothing=0.2,  # noqa: E731
                                      rpo_alpha=0.1, tie=tie, weight=w, chosen_tokens=tokens, rejected_tokens=tokens)[0]
    assert torch.autograd.gradcheck(fn, (c, r))


# ----------------------------------------------------------------------------- KTO


def test_kto_reference_point_is_the_detached_batch_kl_clamped_at_zero():
    kl = T([-1.0, -3.0], requires_grad=True)
    assert float(losses.kto_reference_point(T([0.0, -2.0]), T([-2.0, -2.0]))) == 1.0   # mean(2, 0)
    z0 = losses.kto_reference_point(kl, T([-2.0, -2.0]))                                  # mean(1, −1) = 0
    assert float(z0) == 0.0 and not z0.requires_grad
    assert float(losses.kto_reference_point(T([-4.0, -6.0]), T([-2.0, -2.0]))) == 0.0   # mean −3 → clamped to 0


def test_kto_loss_value_and_gradient():
    # β = 1, z₀ = 1, r = (1, 0), desirable = (yes, no), λ_D = 2, λ_U = 1
    # desirable: 2 (1 − σ(1 − 1)) = 1; undesirable: 1 − σ(1 − 0) = 0.268941; mean 0.634471
    # ∂/∂r₀ = 2 · (−σ'(0)) / 2 = −0.25; ∂/∂r₁ = +σ(1)σ(−1) / 2 = 0.098306
    logps = T([-1.0, -1.0], requires_grad=True)
    loss, m = losses.kto_loss(logps, T([-2.0, -1.0]), T([True, False]), T(1.0), beta=1.0, desirable_weight=2.0)
    assert float(loss.detach()) == pytest.approx((1 + SM1) / 2, abs=1e-5)
    loss.backward()
    assert logps.grad.tolist() == pytest.approx([-0.25, S1 * SM1 / 2], abs=1e-5)
    assert float(m["rewards/desirable"]) == 1.0 and float(m["rewards/undesirable"]) == 0.0 and float(m["kto/kl"]) == 1


def test_kto_weights_and_micro_batches():
    logps, ref, des = T([-1.0, -2.0, -0.5]), T([-1.5, -1.0, -0.5]), T([True, False, True])
    w = T([1.0, 2.0, 0.5])
    whole, _ = losses.kto_loss(logps, ref, des, T(0.2), beta=0.5, undesirable_weight=1.5, weight=w)
    parts = sum(losses.kto_loss(logps[i:i + 1], ref[i:i + 1], des[i:i + 1], T(0.2), beta=0.5, undesirable_weight=1.5,
                                weight=w[i:i + 1], total_weight=w.sum())[0] for i in range(3))
    assert float(parts.detach()) == pytest.approx(float(whole.detach()), abs=1e-6)
    # by hand: r = (0.5, −1, 0); terms 1−σ(0.15), 1.5(1−σ(0.6)), 1−σ(−0.1), weights 1, 2, 0.5
    s = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    want = (1 * (1 - s(0.15)) + 2 * 1.5 * (1 - s(0.6)) + 0.5 * (1 - s(-0.1))) / 3.5
    assert float(whole) == pytest.approx(want, abs=1e-6)


def test_kto_class_weights_put_the_paper_ratio_at_one():
    assert losses.kto_class_weights(10, 30) == (3.0, 1.0)     # λ_D n_D / (λ_U n_U) = 30/30
    assert losses.kto_class_weights(30, 10) == (1.0, 3.0)
    assert losses.kto_class_weights(5, 5) == (1.0, 1.0) and losses.kto_class_weights(0, 5) == (1.0, 1.0)
