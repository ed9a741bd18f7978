"""Every loss and estimator as a pure tensor function: tensors in, ``(loss, metrics)`` out.
Imports torch alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sft_loss(logits: torch.Tensor, targets: torch.Tensor, n_targets: int | torch.Tensor):
    """Token cross-entropy summed over the given positions and divided by ``n_targets``, the number of
    target tokens in the whole optimizer step (all micro-batches), so that micro-batch × accumulation
    equals one big batch.

    logits (N, V) at the positions that predict a target; targets (N,) the next tokens.
    """
    nll = F.cross_entropy(logits.float(), targets, reduction="sum")
    loss = nll / n_targets
    return loss, {"loss/nll_sum": nll.detach(), "loss/tokens": torch.tensor(targets.numel())}


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       tie: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                       label_smoothing: float = 0.0):
    """Reward-model loss on (B,) scores of chosen and rejected replies.

    Preferred pairs: −log σ(r_c − r_r − m) (Ouyang et al. 2022 eq. 1; margin m from Llama 2 §3.2.2); with label
    smoothing ε (the share of labels believed flipped): −(1−ε) log σ(x) − ε log σ(−x), x = r_c − r_r − m, whose
    minimum is at σ(x) = 1 − ε, so no pair is pushed to an infinite margin (cDPO, Mitchell 2023).
    Ties: the Bradley–Terry likelihood of a 50/50 outcome, −½ log σ(d) − ½ log σ(−d), which is
    minimal at d = 0, so tied replies are pulled toward equal scores. Weighted mean over pairs.
    """
    d = chosen - rejected
    margin = torch.zeros_like(d) if margin is None else margin
    tie = torch.zeros_like(d, dtype=torch.bool) if tie is None else tie
    weight = torch.ones_like(d) if weight is None else weight
    x = d - margin
    decided_loss = -(1 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)
    per_pair = torch.where(tie, -0.5 * (F.logsigmoid(d) + F.logsigmoid(-d)), decided_loss)
    loss = (per_pair * weight).sum() / weight.sum()
    decided = ~tie
    acc = ((d > 0) & decided).sum() / decided.sum().clamp(min=1)
    return loss, {"loss/bt": loss.detach(), "reward/accuracy": acc.detach(), "reward/margin": d.detach().mean()}


# --------------------------------------------------------------------------- masking helpers


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, total: float | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (all of them, or along ``dim``). ``total``: divide the
    masked sum by this count instead — the positions of a batch split over processes, of which ``x`` is one part
    (the parts' results then add up to the whole batch's mean)."""
    mask = mask.to(x.dtype)
    if total is not None:
        return (x * mask).sum() / max(total, 1.0)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, total=None) -> torch.Tensor:
    """(x − mean) / std over the masked positions (unbiased variance, as in lm-human-preferences);
    masked-out positions become 0. ``shift_mean=False`` keeps the mean (used for rewards). ``total``: a function
    that sums a list of numbers over the processes a batch is split into (``x`` is one part): mean and variance
    are then the whole batch's (two passes, as here)."""
    if total is None:
        mean = masked_mean(x, mask)
        n = mask.sum().clamp(min=2)
        var = (((x - mean) ** 2) * mask).sum() / (n - 1)
    else:
        m = mask.to(x.dtype)
        s, n = total([float((x * m).sum()), float(m.sum())])
        mean = s / max(n, 1.0)
        var = total([float((((x - mean) ** 2) * m).sum())])[0] / (max(n, 2.0) - 1)
        var = torch.tensor(var, dtype=x.dtype, device=x.device)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


# --------------------------------------------------------------------------- KL and advantages


def kl_estimates(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token estimators of KL(π ‖ π_ref) for tokens sampled from π (Schulman 2020, "Approximating
    KL divergence"): with log r = log π_ref − log π,  k1 = −log r,  k2 = ½ (log r)²,  k3 = (r − 1) − log r.
    k1 is unbiased but can be negative per token; k3 is unbiased and always ≥ 0, but exponential in log r: it
    is clamped to 10 per token (as verl's low_var_kl), so one far-off token cannot make it inf."""
    log_r = ref_logprobs - logprobs
    return {"k1": -log_r, "k2": 0.5 * log_r ** 2, "k3": (torch.expm1(log_r.clamp(max=20.0)) - log_r).clamp(max=10.0)}


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """(B, R) per-token rewards: −β·KL at every reply token and the sequence score added at the last
    reply token (Ziegler et al. 2019; RL_DETAILS item 13). ``kl`` is the per-token k1 estimate."""
    return at_last_token(-beta * kl * mask, mask, scores)


def at_last_token(x: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(B, R) ``x`` with ``values`` (B,) added at each row's last masked position (a copy)."""
    out = x.clone()
    last = (mask.sum(1) - 1).clamp(min=0).long()
    out[torch.arange(len(values)), last] += values
    return out


def turn_bootstrap(start_values: torch.Tensor, next_row: torch.Tensor, end_values: torch.Tensor,
                   turn_gamma: float) -> torch.Tensor:
    """(B,) γ_turn·V(s_{t+1}) for the rows of multi-turn episodes, one row per assistant turn: what the end of turn
    t adds to its reward so that GAE within the turn sees the discounted value of the rest of the episode. V(s_{t+1})
    is the value read at the first reply token of the episode's next turn (``start_values[next_row]``), or
    ``end_values`` where ``next_row`` is −1: 0 after a terminal turn, V of the state the episode was cut in at a
    time limit (bootstrapped, Pardo et al. 2018). start_values, end_values (B,); next_row (B,) long."""
    following = start_values[next_row.clamp(min=0)]
    return turn_gamma * torch.where(next_row >= 0, following, end_values)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), (B, R) in, (advantages,
    returns) out. δ_t = r_t + γ V(s_{t+1}) − V(s_t); A_t = δ_t + γλ A_{t+1}; the value after the last
    reply token (and after padding) is 0. Returns = A + V (the critic's targets)."""
    mask = mask.to(values.dtype)
    next_values = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros_like(values[:, :1])], 1)
    deltas = rewards + gamma * next_values - values
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):  # a scan over time, vectorised over the batch
        next_mask = mask[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)
        last = deltas[:, t] + gamma * lam * last * next_mask
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def adaptive_kl_coef(beta: float, kl: float, target: float, horizon: int, n_steps: int) -> float:
    """Ziegler et al. 2019 §2.2: β ← β (1 + K_β e), e = clip(KL / KL_target − 1, −0.2, 0.2),
    K_β = n_steps / horizon (n_steps = samples seen this update)."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / horizon)


# --------------------------------------------------------------------------- PPO


def truncated_importance_weights(trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor,
                                 cap: float = 2.0) -> tuple[torch.Tensor, dict]:
    """Per-token weights min(π_train(a|s) / π_sampler(a|s), C) for replies drawn by another engine (vLLM), whose
    log-probs differ slightly from the trainer's forward pass (Yao et al. 2025): the policy-gradient estimate is then
    of the trainer's policy, with the variance bounded by C. No gradient; 0 off the reply. Metrics: the ratio's mean
    and the share of tokens truncated."""
    with torch.no_grad():
        ratio = torch.exp(trainer_logprobs - sampler_logprobs)
        weights = torch.clamp(ratio, max=cap) * mask
        metrics = {"rollout/is_ratio_mean": float(masked_mean(ratio, mask)),
                   "rollout/is_truncated": float(masked_mean((ratio > cap).float(), mask))}
    return weights, metrics


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float = 0.2, total_tokens: float | None = None,
                    weights: torch.Tensor | None = None):
    """Clipped surrogate (Schulman et al. 2017, eq. 7), token mean over the masked positions:
    L = E[max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))], ρ = exp(log π − log π_old). ``total_tokens``: the minibatch's tokens
    over every process (loss and metrics are then this part's share: see :func:`masked_mean`). ``weights``: per-token
    importance weights of replies sampled by another engine (:func:`truncated_importance_weights`)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    n = total_tokens
    per_token = torch.max(unclipped, clipped)
    loss = masked_mean(per_token if weights is None else per_token * weights, mask, total=n)
    with torch.no_grad():
        metrics = {"loss/policy": loss.detach(), "ppo/clipfrac": masked_mean((clipped > unclipped).float(), mask, total=n),
                   # KL(π_old ‖ π) on tokens sampled from π_old, ratio ρ = π/π_old: k3 = (ρ − 1) − log ρ (as cleanrl), and k1
                   "ppo/approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask, total=n),
                   "ppo/approx_kl_k1": masked_mean(-log_ratio, mask, total=n),
                   "ppo/ratio_mean": masked_mean(ratio, mask, total=n)}
    return loss, metrics


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2, total_tokens: float | None = None):
    """Clipped value loss (Schulman et al. 2017 baselines; N+ item): ½ E[max((V − G)², (V_clip − G)²)],
    V_clip = V_old + clip(V − V_old, −ε, ε). ``total_tokens``: as :func:`ppo_policy_loss`."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    sq, sq_clipped = (values - returns) ** 2, (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(sq, sq_clipped), mask, total=total_tokens)
    with torch.no_grad():
        metrics = {"loss/value": loss.detach(),
                   "ppo/vf_clipfrac": masked_mean((sq_clipped > sq).float(), mask, total=total_tokens)}
    return loss, metrics


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of softmax(logits): logsumexp(z) − Σ p z."""
    logits = logits.float()
    p = torch.softmax(logits, -1)
    return torch.logsumexp(logits, -1) - (p * logits).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var(G − V) / Var(G) over the masked positions (1 = perfect critic, ≤ 0 = useless)."""
    var_g = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    resid = returns - values
    var_r = masked_mean((resid - masked_mean(resid, mask)) ** 2, mask)
    return 1 - var_r / var_g.clamp(min=1e-8)


# --------------------------------------------------------------------------- Q-learning over candidate replies
# Shapes (QLEARN.md §2.4–2.5): B transitions, K candidate replies per state, H Q heads (clipped double Q).
# ``valid`` (B, K) marks the real candidates of a padded set; heads are the leading dimension.


def td_target(rewards: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor, gamma: float,
              reward_range: tuple[float, float] | None = None) -> torch.Tensor:
    """(B,) TD targets y = r + γ·(1 − terminated)·V(h′) (Mnih et al. 2015, eq. 2 with the max replaced by
    ``next_values``). Only ``terminated`` stops the bootstrap: an episode cut at max_turns (truncated) still
    bootstraps (Pardo et al. 2018, arXiv 1712.00378). With ``reward_range`` = (r_min, r_max) the target is
    clipped to [r_min, r_max] / (1 − γ), the range of any discounted return, so it cannot run away."""
    y = rewards + gamma * (1.0 - terminated.to(rewards.dtype)) * next_values
    if reward_range is not None:
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"clipping the TD target needs 0 <= gamma < 1, got {gamma}")
        y = y.clamp(reward_range[0] / (1.0 - gamma), reward_range[1] / (1.0 - gamma))
    return y.detach()


def double_q_next_value(online_q: torch.Tensor, target_q: torch.Tensor, valid: torch.Tensor):
    """Double-DQN value of the next state over its candidate set (van Hasselt et al. 2016, arXiv 1509.06461,
    eq. 4) with clipped double Q (Fujimoto et al. 2018, eq. 10):
        a* = argmax_{c valid} Q_online(h′, c);   V(h′) = min_i Q̂_i(h′, a*)
    online_q (B, K); target_q (H, B, K). Returns (value (B,), a* (B,)); a row with no valid candidate
    (e.g. a terminal h′) gets value 0 and a* = −1."""
    valid = valid.bool()
    best = online_q.masked_fill(~valid, float("-inf")).argmax(-1)
    value = target_q.gather(-1, best.expand(target_q.shape[0], -1).unsqueeze(-1)).squeeze(-1).min(0).values
    some = valid.any(-1)
    return torch.where(some, value, torch.zeros_like(value)).detach(), torch.where(some, best, -1)


def huber_td_loss(q: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, delta: float = 1.0):
    """Σ_heads masked-mean Huber(Q_i(h, a) − y) (Nature DQN's error clipping; SB3 smooth_l1):
    ½x² for |x| ≤ δ, δ(|x| − ½δ) beyond. q (H, B) Q of the taken reply per head; target (B,); mask (B,)."""
    mask = torch.ones_like(target) if mask is None else mask.to(target.dtype)
    err = q - target.detach()
    per = F.huber_loss(q, target.detach().expand_as(q), reduction="none", delta=delta)
    loss = masked_mean(per, mask.expand_as(per), dim=-1).sum()
    with torch.no_grad():
        metrics = {"loss/td": loss.detach(), "q/taken_mean": masked_mean(q[0], mask),
                   "q/td_abs_error": masked_mean(err.abs().mean(0), mask), "q/target_mean": masked_mean(target, mask)}
    return loss, metrics


def cql_loss(q: torch.Tensor, valid: torch.Tensor, taken: torch.Tensor, log_behavior: torch.Tensor | None = None):
    """CQL(H) over a candidate set (Kumar et al. 2020, arXiv 2006.04779, eq. 4, the action space restricted to
    the set C(h), which must contain the taken reply): Σ_heads mean_B [ log Σ_{c∈C} exp Q_i(h, c) − Q_i(h, a) ].
    With ``log_behavior`` = log π_β(c|h) (candidates sampled from π_β) the logsumexp is the importance-sampled
    estimate log (1/|C|) Σ_c exp(Q_i(h, c) − log π_β(c|h)) (CQL appendix F; Snell's CHAI). q (H, B, K);
    valid (B, K); taken (B,) index of the taken reply in C; log_behavior (B, K)."""
    valid = valid.bool()
    logits = q if log_behavior is None else q - log_behavior
    lse = logits.masked_fill(~valid, float("-inf")).logsumexp(-1)
    if log_behavior is not None:
        lse = lse - valid.sum(-1).to(q.dtype).log()
    q_taken = q.gather(-1, taken.expand(q.shape[0], -1).unsqueeze(-1)).squeeze(-1)
    gap = lse - q_taken  # (H, B)
    loss = gap.mean(-1).sum()
    return loss, {"loss/cql": loss.detach(), "q/cql_gap": gap.detach().mean()}


def expectile_loss(diff: torch.Tensor, tau: float = 0.7, mask: torch.Tensor | None = None):
    """IQL value loss (Kostrikov et al. 2021, arXiv 2110.06169, eq. 5; ILQL L_V): masked mean of
    |τ − 1{u < 0}|·u², u = min_i Q̂_i(h, a) − V(h). τ > ½ weighs u > 0 more, pulling V toward an upper
    expectile of Q over the logged replies — a soft max that never leaves the data."""
    mask = torch.ones_like(diff) if mask is None else mask.to(diff.dtype)
    weight = torch.where(diff < 0, 1.0 - tau, tau)
    loss = masked_mean(weight * diff ** 2, mask)
    return loss, {"loss/expectile": loss.detach(), "q/advantage_mean": masked_mean(diff.detach(), mask)}


def iql_loss(q: torch.Tensor, q_hat: torch.Tensor, v: torch.Tensor, next_v: torch.Tensor, rewards: torch.Tensor,
             terminated: torch.Tensor, gamma: float, tau: float = 0.7):
    """Utterance-level IQL (Kostrikov et al. 2021, arXiv 2110.06169, eqs. 5–6; ILQL's L_Q + L_V, QLEARN §2.5):
        L_Q = Σ_i Huber(Q_i(h, a) − [r + γ(1 − terminated)·V(h′)])      V(h′) detached: no max over replies
        L_V = expectile_τ(min_i Q̂_i(h, a) − V(h))                       Q̂: the target heads, no graph
    q (H, B) online Q of the logged reply; q_hat (H, B) target Q; v (B,) V(h); next_v (B,) V(h′)."""
    y = td_target(rewards, next_v.detach(), terminated, gamma)
    loss_q, metrics = huber_td_loss(q, y)
    loss_v, v_metrics = expectile_loss(q_hat.detach().min(0).values - v, tau)
    metrics.update(v_metrics)
    metrics["q/value_mean"] = v.detach().mean()
    return loss_q + loss_v, metrics


# --------------------------------------------------------------------------- critic-free policy gradient (GRPO, RLOO)
# B = P prompts × G replies, the G replies to a prompt in consecutive rows (rows p·G … p·G + G − 1). One scalar
# advantage per reply, the same at every one of its tokens; no critic. TRL's conventions (grpo_trainer.py
# _compute_loss, rloo_trainer.py) unless a docstring says otherwise.


def group_advantages(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(B,) GRPO advantages (Shao et al. 2024, DeepSeekMath §4.1.2, outcome supervision): Â_i = (r_i − mean_g r) /
    (std_g r + ε) over the G replies of the same prompt, std unbiased and ε = 1e-4 as TRL. ``scale=False``: mean-
    centred only — Dr.GRPO (Liu et al. 2025 §3.1) drops the std, which over-weights groups that nearly agree."""
    grouped = scores.float().view(-1, group_size)
    adv = grouped - grouped.mean(1, keepdim=True)
    if scale:
        adv = adv / (grouped.std(1, keepdim=True) + eps)
    return adv.flatten()


def rloo_advantages(scores: torch.Tensor, group_size: int, scale: bool = False, eps: float = 1e-4) -> torch.Tensor:
    """(B,) REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024 eq. 6): Â_i = r_i − 1/(G−1)
    Σ_{j≠i} r_j, the mean of the *other* replies as baseline, so Â_i does not depend on r_i through its baseline.
    Equals G/(G−1)·(r_i − mean_g r). ``scale``: also divided by the group's std + ε (off in RLOO and TRL)."""
    grouped = scores.float().view(-1, group_size)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
    adv = grouped - baseline
    if scale:
        adv = adv / (grouped.std(1, keepdim=True) + eps)
    return adv.flatten()


def group_stats(scores: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """Per-group reward statistics for logging: mean of the groups' means and stds (unbiased), and the fraction of
    groups whose G rewards are all equal (std 0: their advantages are 0, so they teach nothing)."""
    grouped = scores.float().view(-1, group_size)
    std = grouped.std(1)
    return {"group/reward_mean": grouped.mean(1).mean(), "group/reward_std": std.mean(),
            "group/zero_std_fraction": torch.isclose(std, torch.zeros_like(std)).float().mean()}


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, eps_low: float = 0.2, eps_high: float = 0.2, total: float | None = None):
    """(B, R) per-token clipped surrogate −min(ρ·Â, clip(ρ, 1 − ε_low, 1 + ε_high)·Â), ρ = π/π_old (Schulman et al.
    2017 eq. 7 with DAPO's decoupled "clip-higher" ε_high, Yu et al. 2025 eq. 10); ``advantages`` (B,) one per reply.
    Metrics (token means): clipped fractions below (ρ < 1 − ε_low with Â < 0) and above (ρ > 1 + ε_high with Â > 0),
    as TRL counts them, and the mean ratio; ``total``: over that many tokens instead (see :func:`masked_mean`)."""
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv)
    with torch.no_grad():
        low, high = (ratio < 1.0 - eps_low) & (adv < 0), (ratio > 1.0 + eps_high) & (adv > 0)
        metrics = {"grpo/clip_low": masked_mean(low.float(), mask, total=total),
                   "grpo/clip_high": masked_mean(high.float(), mask, total=total),
                   "grpo/clipfrac": masked_mean((low | high).float(), mask, total=total),
                   "grpo/ratio_mean": masked_mean(ratio, mask, total=total)}
    return per_token, metrics


# Loss aggregations: per-token losses (B, R) of a micro-batch → its share of the optimizer step's loss. The
# denominators count the whole optimizer step (all its micro-batches), so that accumulating micro-batches gives
# exactly the loss of one big batch (as sft_loss's n_targets).


def grpo_aggregate(per_token: torch.Tensor, mask: torch.Tensor, n_sequences: int, **_) -> torch.Tensor:
    """GRPO (Shao et al. 2024 eq. 3): each reply's token mean, then the mean over the step's ``n_sequences`` replies.
    A long reply's tokens each weigh less than a short one's (the length bias Dr.GRPO removes)."""
    return (masked_mean(per_token, mask, dim=1)).sum() / n_sequences


def dr_grpo_aggregate(per_token: torch.Tensor, mask: torch.Tensor, n_sequences: int, max_tokens: int,
                      **_) -> torch.Tensor:
    """Dr.GRPO (Liu et al. 2025 §3.1): the sum over all tokens divided by a constant, replies × the generation budget
    ``max_tokens`` (TRL: max_completion_length), so every token weighs the same whatever the reply's length."""
    return (per_token * mask).sum() / (n_sequences * max_tokens)


def dapo_aggregate(per_token: torch.Tensor, mask: torch.Tensor, n_tokens: int, **_) -> torch.Tensor:
    """DAPO (Yu et al. 2025 eq. 8, token-level policy gradient): the mean over every reply token of the step."""
    return (per_token * mask).sum() / n_tokens


LOSS_AGGREGATIONS = {"grpo": grpo_aggregate, "dr_grpo": dr_grpo_aggregate, "dapo": dapo_aggregate}


def grpo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                     loss_type: str, n_sequences: int, n_tokens: int, max_tokens: int, eps_low: float = 0.2,
                     eps_high: float = 0.2, ref_logprobs: torch.Tensor | None = None, beta: float = 0.0):
    """The GRPO / Dr.GRPO / DAPO / RLOO policy loss of a micro-batch: the clipped surrogate plus β·k3 KL to the
    reference at every token (DeepSeekMath eq. 3–4; k3 = π_ref/π − log(π_ref/π) − 1, clamped at 10 per token as
    :func:`kl_estimates`), aggregated by ``loss_type`` (see LOSS_AGGREGATIONS) with the optimizer step's
    ``n_sequences``, ``n_tokens`` and ``max_tokens``. logprobs, old_logprobs, ref_logprobs, mask (B, R); advantages (B,).
    Metrics: this micro-batch's share of the step's token means (they add up over the step's micro-batches)."""
    per_token, metrics = clipped_surrogate(logprobs, old_logprobs, advantages, mask, eps_low, eps_high, n_tokens)
    if ref_logprobs is not None and beta != 0.0:
        kl = kl_estimates(logprobs, ref_logprobs)["k3"]
        per_token = per_token + beta * kl
        metrics["loss/kl_k3"] = masked_mean(kl.detach(), mask, total=n_tokens)
    loss = LOSS_AGGREGATIONS[loss_type](per_token, mask, n_sequences=n_sequences, n_tokens=n_tokens,
                                        max_tokens=max_tokens)
    metrics["loss/policy"] = loss.detach()
    return loss, metrics


# --------------------------------------------------------------------------- preference optimisation
# DPO and its variants on (B,) sequence log-probs of B pairs (sums over the reply tokens), KTO on (N,) unpaired
# replies. ``weight`` (B,) is each pair's weight (annotator reliability, source weight); ``total_weight`` the weight
# of the whole optimizer step, so that micro-batch × accumulation equals one big batch (default: this batch's).
# ``tie`` (B,) marks pairs with no preference (ties and both-bad pairs, as the reward model takes them).


def dpo_sigmoid(x: torch.Tensor, tie: torch.Tensor, label_smoothing: float = 0.0, **_):
    """DPO (Rafailov et al. 2023, eq. 7) on x = β·Δ: −log σ(x); with label smoothing ε, conservative DPO (cDPO,
    Mitchell 2023): −(1 − ε) log σ(x) − ε log σ(−x), the loss when a fraction ε of the labels are flipped. A tie is
    the Bradley–Terry likelihood of a 50/50 outcome (ε = ½), minimal at x = 0, as in the reward model."""
    eps = torch.where(tie, 0.5, label_smoothing)
    return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def dpo_robust(x: torch.Tensor, tie: torch.Tensor, label_smoothing: float = 0.0, **_):
    """Robust DPO (Chowdhury et al. 2024, eq. 8): the unbiased loss under label flips with rate ε,
    (−(1 − ε) log σ(x) + ε log σ(−x)) / (1 − 2ε) (TRL's `robust`). A tie as in :func:`dpo_sigmoid`."""
    robust = (-(1 - label_smoothing) * F.logsigmoid(x) + label_smoothing * F.logsigmoid(-x)) / (1 - 2 * label_smoothing)
    return torch.where(tie, -0.5 * (F.logsigmoid(x) + F.logsigmoid(-x)), robust)


def dpo_hinge(x: torch.Tensor, tie: torch.Tensor, **_):
    """SLiC hinge (Zhao et al. 2023; TRL's `hinge`): max(0, 1 − x). A tie: ½[max(0, 1 − x) + max(0, 1 + x)],
    flat (= 1) inside the band |x| ≤ 1 and pushed back into it from either side."""
    return torch.where(tie, 0.5 * (F.relu(1 - x) + F.relu(1 + x)), F.relu(1 - x))


def dpo_ipo(h: torch.Tensor, tie: torch.Tensor, beta: float = 0.1, **_):
    """IPO (Azar et al. 2023, eq. 17) with τ = β: (h − 1/(2β))², h = Δ with each reply's log-ratio divided by its
    token count (as TRL, confirmed with the IPO authors). The population form is (h − (p − ½)/β)², so a tie
    (p = ½) targets h = 0."""
    return (h - torch.where(tie, 0.0, 1 / (2 * beta))) ** 2


DPO_LOSSES = {"sigmoid": dpo_sigmoid, "robust": dpo_robust, "hinge": dpo_hinge, "ipo": dpo_ipo}


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, rpo_alpha: float = 0.0, tie=None, weight=None,
             chosen_tokens=None, rejected_tokens=None, total_weight=None):
    """Weighted mean over pairs of a DPO variant (:data:`DPO_LOSSES`) on Δ = (log π − log π_ref)(chosen) −
    (log π − log π_ref)(rejected), plus the RPO term (Pang et al. 2024, eq. 1): ``rpo_alpha`` × the chosen reply's
    NLL per token, on decided pairs only (a tie or a both-bad pair has no reply to imitate). All (B,); the token
    counts (B,) are needed for ipo and the RPO term. Metrics as TRL's (rewards = β·log-ratio), but the accuracy over
    decided pairs counts an exact tie of rewards as half, as the reward model's (so the untrained policy reads ½)."""
    tie = torch.zeros_like(chosen_logps, dtype=torch.bool) if tie is None else tie
    weight = torch.ones_like(chosen_logps) if weight is None else weight
    total = weight.sum() if total_weight is None else total_weight
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    if loss_type == "ipo":
        x = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
    else:
        x = beta * (chosen_ratio - rejected_ratio)
    per_pair = DPO_LOSSES[loss_type](x, tie, label_smoothing=label_smoothing, beta=beta)
    nll = torch.zeros_like(per_pair)
    if rpo_alpha:
        nll = torch.where(tie, 0.0, -chosen_logps / chosen_tokens.clamp(min=1))
    loss = ((per_pair + rpo_alpha * nll) * weight).sum() / total
    with torch.no_grad():
        c, r = beta * chosen_ratio, beta * rejected_ratio
        decided = ~tie
        metrics = {"loss/dpo": (per_pair * weight).sum() / total, "rewards/chosen": c.mean(), "rewards/rejected": r.mean(), "rewards/margins": (c - r).mean(),
                   "rewards/accuracies": (((c > r) + 0.5 * (c == r)) * decided).sum() / decided.sum().clamp(min=1),
                   "logps/chosen": chosen_logps.mean(), "logps/rejected": rejected_logps.mean()}
        if rpo_alpha:
            metrics["loss/nll"] = (nll * weight).sum() / total
    return loss, {k: v.detach() for k, v in metrics.items()}


def kto_reference_point(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, total=None) -> torch.Tensor:
    """KTO's reference point z₀ (Ethayarajh et al. 2024, eq. 7): the batch estimate of KL(π ‖ π_ref),
    mean(log π(y'|x) − log π_ref(y'|x)) over mismatched pairs (x, y') — each prompt with another example's reply,
    as TRL builds them — detached (no gradient flows through z₀) and clamped ≥ 0. ``total``: a function that sums a
    list of numbers over the processes a batch is split into (the mean is then the whole batch's)."""
    diff = (kl_logps - ref_kl_logps).detach()
    if total is None:
        return diff.mean().clamp(min=0)
    s, n = total([float(diff.sum()), float(len(diff))])
    return torch.tensor(max(s / max(n, 1.0), 0.0), dtype=diff.dtype)


def kto_loss(logps, ref_logps, desirable, z0, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0, weight=None, total_weight=None, class_counts=None):
    """KTO (Ethayarajh et al. 2024, eq. 7; TRL's `kto`) on (N,) unpaired replies with r = log π − log π_ref:
    desirable λ_D (1 − σ(β(r − z₀))), undesirable λ_U (1 − σ(β(z₀ − r))); weighted mean over the replies
    (divided by the weights, not by the λ, as TRL's mean). z₀ from :func:`kto_reference_point`. ``class_counts``
    (desirable, undesirable) of the whole step: the reward metrics are then this part's share of each class's mean."""
    weight = torch.ones_like(logps) if weight is None else weight
    total = weight.sum() if total_weight is None else total_weight
    r = logps - ref_logps
    per = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                      undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    loss = (per * weight).sum() / total
    with torch.no_grad():
        rewards = beta * r
        n_d, n_u = (desirable.sum(), (~desirable).sum()) if class_counts is None else map(torch.tensor, class_counts)
        metrics = {"loss/kto": loss, "kto/kl": z0,
                   "rewards/desirable": torch.where(desirable, rewards, 0.0).sum() / n_d.clamp(min=1),
                   "rewards/undesirable": torch.where(desirable, 0.0, rewards).sum() / n_u.clamp(min=1)}
    return loss, {k: v.detach() for k, v in metrics.items()}


def kto_class_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """(λ_D, λ_U) that put λ_D·n_D / (λ_U·n_U) at 1, the low end of the paper's range [1, 4/3] (Ethayarajh et al.
    2024, eq. 8): the rarer class is up-weighted, the other keeps weight 1."""
    if n_desirable <= 0 or n_undesirable <= 0:
        return 1.0, 1.0
    if n_desirable < n_undesirable:
        return n_undesirable / n_desirable, 1.0
    return 1.0, n_desirable / n_undesirable
