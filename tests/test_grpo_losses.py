"""GRPO / Dr.GRPO / DAPO / RLOO pieces of losses.py on a hand-made group, worked on paper: advantages, the clipped
surrogate with ε low/high, the three loss normalisations (values and gradients), the k3 KL term, and micro-batch
accumulation equal to one big batch."""

import math

import pytest
import torch

from chatrlhf import losses

T = torch.tensor


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


# Two prompts, G = 4 replies each. Group 0 rewards (1, 2, 3, 6): mean 3, deviations (−2, −1, 0, 3),
# unbiased variance (4 + 1 + 0 + 9) / 3 = 14/3, std √(14/3) = 2.16025. Group 1 all equal (5, 5, 5, 5): std 0.
SCORES = T([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
STD0 = math.sqrt(14 / 3)


def test_group_advantages_hand_computed():
    adv = losses.group_advantages(SCORES, 4)
    assert close(adv[:4], [d / (STD0 + 1e-4) for d in (-2, -1, 0, 3)])
    assert close(adv[4:], [0.0] * 4)                       # a group that agrees: 0 / (0 + ε) = 0, no NaN
    assert close(losses.group_advantages(SCORES, 4, scale=False), [-2, -1, 0, 3, 0, 0, 0, 0])   # Dr.GRPO


def test_rloo_leave_one_out_baseline_hand_computed():
    # reply 0's baseline = mean of the others (2 + 3 + 6) / 3 = 11/3 → Â = 1 − 11/3 = −8/3; reply 1: 2 − 10/3 = −4/3;
    # reply 2: 3 − 3 = 0; reply 3: 6 − 2 = 4. That is G/(G−1) = 4/3 × the deviations (−2, −1, 0, 3).
    adv = losses.rloo_advantages(SCORES, 4)
    assert close(adv, [-8 / 3, -4 / 3, 0.0, 4.0, 0, 0, 0, 0])
    assert close(losses.rloo_advantages(SCORES, 4, scale=True)[:4], [a / (STD0 + 1e-4) for a in (-8 / 3, -4 / 3, 0, 4)])
    # G = 2: each reply's baseline is the other reply
    assert close(losses.rloo_advantages(T([1.0, 4.0]), 2), [-3.0, 3.0])


def test_group_stats_count_groups_without_signal():
    s = losses.group_stats(SCORES, 4)
    assert close(s["group/reward_mean"], 4.0) and close(s["group/reward_std"], STD0 / 2)
    assert close(s["group/zero_std_fraction"], 0.5)


def test_clipped_surrogate_with_clip_higher_hand_computed():
    # four tokens of two replies: ratios 1.5, 0.5 (reply 0, Â = +1) and 1.5, 0.5 (reply 1, Â = −1); ε_low 0.2,
    # ε_high 0.28. Reply 0: −min(1.5, 1.28) = −1.28 (clipped high), −min(0.5, 0.8) = −0.5 (not clipped: ρ < 1 − ε
    # with Â > 0 is the side PPO never clips). Reply 1: −min(−1.5, −1.28) = 1.5 (not clipped), −min(−0.5, −0.8) =
    # 0.8 (clipped low).
    old = T([[0.0, 0.0], [0.0, 0.0]])
    lp = torch.log(T([[1.5, 0.5], [1.5, 0.5]]))
    mask = torch.ones(2, 2)
    per_token, m = losses.clipped_surrogate(lp, old, T([1.0, -1.0]), mask, eps_low=0.2, eps_high=0.28)
    assert close(per_token, [[-1.28, -0.5], [1.5, 0.8]])
    assert close(m["grpo/clip_high"], 0.25) and close(m["grpo/clip_low"], 0.25) and close(m["grpo/clipfrac"], 0.5)
    assert close(m["grpo/ratio_mean"], 1.0)


# Per-token losses of 2 replies, lengths 3 and 1 (max_tokens 4):
#   reply 0: (1, 2, 3) → token mean 2;  reply 1: (6) → 6;  masked-out position holds 100, which must never count.
PER_TOKEN = T([[1.0, 2.0, 3.0], [6.0, 100.0, 100.0]])
MASK = T([[1, 1, 1], [1, 0, 0]])


def test_loss_aggregations_hand_computed():
    assert close(losses.grpo_aggregate(PER_TOKEN, MASK, n_sequences=2), (2 + 6) / 2)               # 4
    assert close(losses.dr_grpo_aggregate(PER_TOKEN, MASK, n_sequences=2, max_tokens=4), 12 / (2 * 4))  # 1.5
    assert close(losses.dapo_aggregate(PER_TOKEN, MASK, n_tokens=4), 12 / 4)                        # 3


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_normalisation_gradients_hand_computed(loss_type):
    # At ρ = 1 (old = current, no clipping) d loss / d log π_it = −Â_i · w_it, with w the aggregation weight of token
    # t of reply i: grpo 1 / (|o_i| · n_seq), dr_grpo 1 / (n_seq · max_tokens), dapo 1 / n_tokens.
    adv = T([0.5, -2.0])
    lp = T([[-1.0, -2.0, -0.5], [-0.3, -9.0, -9.0]], requires_grad=True)
    loss, _ = losses.grpo_policy_loss(lp, lp.detach(), adv, MASK, loss_type, n_sequences=2, n_tokens=4, max_tokens=4)
    loss.backward()
    w = {"grpo": T([[1 / 6, 1 / 6, 1 / 6], [1 / 2, 0, 0]]), "dr_grpo": torch.full((2, 3), 1 / 8) * MASK,
         "dapo": torch.full((2, 3), 1 / 4) * MASK}[loss_type]
    assert close(lp.grad, -adv[:, None] * w)
    # and the value: −Σ Â_i Σ_t w_it
    assert close(loss, float(-(adv[:, None] * w).sum()))


def test_k3_kl_term_value_and_gradient():
    # one token, π = 0.5, π_ref = 0.25: log r = log(π_ref/π) = −ln 2, k3 = r − 1 − log r = −0.5 + ln 2;
    # d k3 / d log π = 1 − r = 0.5. With Â = 0 only the KL term moves: loss = β·k3 (dapo, one token).
    lp = torch.log(T([[0.5]])).requires_grad_(True)
    loss, m = losses.grpo_policy_loss(lp, lp.detach(), T([0.0]), T([[1.0]]), "dapo", 1, 1, 1,
                                      ref_logprobs=torch.log(T([[0.25]])), beta=0.1)
    assert close(loss, 0.1 * (-0.5 + math.log(2))) and close(m["loss/kl_k3"], -0.5 + math.log(2))
    loss.backward()
    assert close(lp.grad, [[0.1 * 0.5]])


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_accumulate_to_one_big_batch(loss_type):
    torch.manual_seed(0)
    lp = torch.randn(6, 5, requires_grad=True)
    old, ref = lp.detach() + 0.3 * torch.randn(6, 5), lp.detach() + 0.2 * torch.randn(6, 5)
    mask = (torch.arange(5)[None] < T([5, 3, 1, 4, 2, 5])[:, None]).float()
    adv = torch.randn(6)
    norm = dict(n_sequences=6, n_tokens=int(mask.sum()), max_tokens=5)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.05)
    full, _ = losses.grpo_policy_loss(lp, old, adv, mask, loss_type, ref_logprobs=ref, **norm, **kw)
    full.backward()
    g_full, lp.grad = lp.grad.clone(), None
    parts = 0.0
    for rows in (slice(0, 2), slice(2, 6)):
        part, _ = losses.grpo_policy_loss(lp[rows], old[rows], adv[rows], mask[rows], loss_type, ref_logprobs=ref[rows],
                                          **norm, **kw)
        part.backward()
        parts += float(part.detach())
    assert math.isclose(parts, float(full.detach()), rel_tol=1e-5) and close(lp.grad, g_full)
