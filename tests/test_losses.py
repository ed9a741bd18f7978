import math

import torch

from chatrlhf import losses


def test_sft_loss_hand_computed():
    # two positions, vocab 3. Row 0 logits (0, 0, 0): -log softmax = log 3 for any target.
    # Row 1 logits (ln 1, ln 2, ln 1) = probabilities (1/4, 2/4, 1/4); target 1 -> -log(1/2) = log 2.
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0]])
    targets = torch.tensor([2, 1])
    loss, m = losses.sft_loss(logits, targets, n_targets=2)
    assert math.isclose(float(loss), (math.log(3) + math.log(2)) / 2, rel_tol=1e-6)
    assert math.isclose(float(m["loss/nll_sum"]), math.log(3) + math.log(2), rel_tol=1e-6)
    assert int(m["loss/tokens"]) == 2


def test_sft_loss_divides_by_step_tokens_not_batch_tokens():
    # With 5 target tokens in the whole optimizer step, a micro-batch of 2 contributes nll/5.
    logits = torch.zeros(2, 4)
    loss, _ = losses.sft_loss(logits, torch.tensor([0, 3]), n_targets=5)
    assert math.isclose(float(loss), 2 * math.log(4) / 5, rel_tol=1e-6)


# ----------------------------------------------------------------------------- PPO pieces, worked on paper

T = torch.tensor


def close(a, b, tol=1e-4):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


def test_kl_estimators_hand_computed():
    # π = 0.5, π_ref = 0.25 → log r = log(π_ref/π) = −log 2
    k = losses.kl_estimates(torch.log(T([0.5])), torch.log(T([0.25])))
    ln2 = math.log(2)
    assert close(k["k1"], [ln2]) and close(k["k2"], [0.5 * ln2 ** 2]) and close(k["k3"], [-0.5 + ln2])
    same = losses.kl_estimates(T([-1.3, -0.2]), T([-1.3, -0.2]))
    assert all(close(v, [0.0, 0.0]) for v in same.values())
    # one token far off (log r = 30): k3 = e^30 − 31 would swamp any mean; it is clamped to 10 per token, finite
    far = losses.kl_estimates(T([-40.0]), T([-10.0]))
    assert close(far["k3"], [10.0]) and close(far["k1"], [-30.0])


def test_masked_whiten_uses_only_masked_positions():
    x = T([[1.0, 2.0, 3.0], [4.0, 99.0, -50.0]])
    mask = T([[1, 1, 1], [1, 0, 0]])
    std = math.sqrt(5 / 3)  # values 1..4: mean 2.5, unbiased variance 5/3
    expected = T([[-1.5 / std, -0.5 / std, 0.5 / std], [1.5 / std, 0.0, 0.0]])
    assert close(losses.masked_whiten(x, mask), expected)
    kept = losses.masked_whiten(x, mask, shift_mean=False)
    assert close(kept[0, 0], 2.5 - 1.5 / std)
    assert close(losses.masked_mean(x, mask), 2.5)


def test_token_rewards_put_score_on_last_reply_token():
    kl = T([[0.1, 0.2, 0.3], [0.5, 0.5, 9.0]])
    mask = T([[1, 1, 1], [1, 1, 0]])
    r = losses.token_rewards(T([1.0, 2.0]), kl, mask, beta=0.5)
    assert close(r, [[-0.05, -0.1, 0.85], [-0.25, 1.75, 0.0]])


GAE_REWARDS = T([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
GAE_VALUES = T([[0.5, 0.5, 0.5], [1.0, 1.0, 0.0]])
GAE_MASK = T([[1, 1, 1], [1, 1, 0]])


def test_gae_hand_computed():
    # γ = 1, λ = 0.5. Row 0: δ = (0, 0, 0.5) → A = (0.125, 0.25, 0.5). Row 1 (2 tokens): δ = (0, 1) → A = (0.5, 1).
    adv, ret = losses.gae(GAE_REWARDS, GAE_VALUES, GAE_MASK, gamma=1.0, lam=0.5)
    assert close(adv, [[0.125, 0.25, 0.5], [0.5, 1.0, 0.0]])
    assert close(ret, [[0.625, 0.75, 1.0], [1.5, 2.0, 0.0]])


def gae_plain_loop(rewards, values, mask, gamma, lam):
    adv = [[0.0] * len(r) for r in rewards]
    for i in range(len(rewards)):
        n = int(sum(mask[i]))
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[i][t + 1] if t + 1 < n else 0.0
            delta = rewards[i][t] + gamma * next_v - values[i][t]
            last = delta + gamma * lam * last
            adv[i][t] = last
    return adv


def test_gae_matches_plain_loop_on_random_batch():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    lengths = [7, 1, 4, 6, 3]
    mask = T([[1.0] * n + [0.0] * (7 - n) for n in lengths])
    for gamma, lam in ((1.0, 0.95), (0.9, 0.5)):
        adv, _ = losses.gae(rewards, values * mask, mask, gamma, lam)
        ref = gae_plain_loop(rewards.tolist(), (values * mask).tolist(), mask.tolist(), gamma, lam)
        assert close(adv, ref, 1e-5)


def test_ppo_clipped_policy_loss_hand_computed():
    # ratios (1.5, 0.5, 1.0), advantages (1, 1, −1), ε 0.2:
    # token 0 clipped → −1.2; token 1 unclipped → −0.5; token 2 → 1.  mean = −0.7 / 3
    logprobs = torch.log(T([1.5, 0.5, 1.0]))
    loss, m = losses.ppo_policy_loss(logprobs, torch.zeros(3), T([1.0, 1.0, -1.0]), torch.ones(3), clip=0.2)
    assert close(loss, -0.7 / 3)
    assert close(m["ppo/clipfrac"], 1 / 3)
    assert close(m["ppo/ratio_mean"], 1.0)
    # approx KL(π_old ‖ π), ρ = π/π_old: k3 = mean((ρ − 1) − log ρ) = ((0.5 − ln 1.5) + (−0.5 − ln 0.5) + 0) / 3;
    # k1 = mean(−log ρ) = (−ln 1.5 − ln 0.5) / 3
    assert close(m["ppo/approx_kl"], (0.5 - math.log(1.5) - 0.5 - math.log(0.5)) / 3)
    assert close(m["ppo/approx_kl_k1"], (-math.log(1.5) - math.log(0.5)) / 3)
    # masked-out tokens do not count
    loss2, _ = losses.ppo_policy_loss(logprobs, torch.zeros(3), T([1.0, 1.0, -1.0]), T([1, 0, 0]), clip=0.2)
    assert close(loss2, -1.2)


def test_ppo_loss_gradient_is_zero_when_clipped():
    lp = torch.log(T([1.5])).requires_grad_()
    loss, _ = losses.ppo_policy_loss(lp, torch.zeros(1), T([1.0]), torch.ones(1))
    loss.backward()
    assert float(lp.grad) == 0.0


def test_value_loss_clipping_hand_computed():
    # V = (1, 0), V_old = (0.5, 0.5), G = (2, 0), ε 0.2 → V_clip = (0.7, 0.3)
    # squared errors (1, 0), clipped (1.69, 0.09) → max (1.69, 0.09) → ½ · mean = 0.445
    loss, m = losses.value_loss(T([1.0, 0.0]), T([0.5, 0.5]), T([2.0, 0.0]), torch.ones(2), clip=0.2)
    assert close(loss, 0.445)
    assert close(m["ppo/vf_clipfrac"], 1.0)


def test_adaptive_kl_coefficient():
    # e = clip(9/6 − 1, ±0.2) = 0.2, K = 64/10000 → β · (1 + 0.00128)
    assert math.isclose(losses.adaptive_kl_coef(0.1, 9.0, 6.0, 10000, 64), 0.1 * 1.00128)
    assert math.isclose(losses.adaptive_kl_coef(0.1, 6.0, 6.0, 10000, 64), 0.1)
    assert losses.adaptive_kl_coef(0.1, 0.0, 6.0, 10000, 64) < 0.1


def test_entropy_and_explained_variance():
    h = losses.entropy_from_logits(T([[0.0, 0.0], [0.0, math.log(3)]]))
    assert close(h, [math.log(2), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))])
    g, mask = T([1.0, 2.0, 3.0]), torch.ones(3)
    assert close(losses.explained_variance(g, g, mask), 1.0)
    assert close(losses.explained_variance(torch.zeros(3), g, mask), 0.0)
