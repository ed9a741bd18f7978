"""The failure signs of RLHF runs (RL_DETAILS "Known failure signs"), read off the per-step metrics.
Each rule looks at the history of logged metrics and returns a message when its sign shows."""

from __future__ import annotations

import numpy as np


def _series(history: list[dict], key: str) -> list[float]:
    return [h[key] for h in history if isinstance(h.get(key), (int, float)) and np.isfinite(h[key])]


def kl_accelerating(history, **_):
    kl = _series(history, "objective/kl")[-4:]
    if len(kl) == 4 and kl[-1] > 1.0:
        d = np.diff(kl)
        if (d > 0).all() and d[1] > d[0] and d[2] > d[1]:
            return (f"KL to the reference is rising faster every step ({' → '.join(f'{k:.2f}' for k in kl)}): "
                    "likely reward hacking — raise --kl-coef or lower --lr")


def entropy_collapse(history, **_):
    ent = _series(history, "policy/entropy")
    if len(ent) >= 2 and ent[0] > 0 and ent[-1] < 0.3 * ent[0]:
        return (f"policy entropy collapsed from {ent[0]:.2f} to {ent[-1]:.2f}: the policy is becoming "
                "deterministic — raise --kl-coef or lower --lr")


def identical_replies(history, **_):
    shared = _series(history, "rollout/cross_prompt_duplicates")
    if shared and shared[-1] > 0.5:
        return (f"{shared[-1]:.0%} of the replies in this batch are also given to another prompt: the policy gives "
                "the same reply to different prompts (reward hacking)")


def length_spike(history, **_):
    lengths = _series(history, "rollout/length")
    if len(lengths) >= 4 and lengths[-1] > 2 * np.median(lengths[-11:-1]):
        return (f"reply length jumped to {lengths[-1]:.1f} tokens (median so far {np.median(lengths[-11:-1]):.1f}): "
                "raise --kl-coef or add a length penalty")


def negative_kl(history, **_):
    kl = _series(history, "objective/kl")
    if kl and kl[-1] < -0.1:
        return (f"KL to the reference is negative ({kl[-1]:.3f}): sampling and log-prob recomputation differ "
                "(temperature, top-k/top-p or dtype)")


def reward_up_similarity_down(history, window: int = 5, **_):
    rew, sim = _series(history, "reward/total_mean"), _series(history, "reward/similarity_mean")
    if len(rew) >= window and len(sim) >= window:
        x = np.arange(window)
        r_slope, s_slope = np.polyfit(x, rew[-window:], 1)[0], np.polyfit(x, sim[-window:], 1)[0]
        if r_slope > 0 and s_slope < 0 and sim[-window] - sim[-1] > 0.05:
            return (f"reward is rising while similarity to human replies falls ({sim[-window]:.3f} → {sim[-1]:.3f}): "
                    "the policy is over-optimising the reward model")


def kl_over_bound(history, kl_bound: float = float("inf"), **_):
    kl = _series(history, "objective/kl")
    if kl and kl[-1] > kl_bound:
        return f"KL to the reference per reply is {kl[-1]:.2f}, above --kl-bound {kl_bound}"


RULES = (kl_accelerating, entropy_collapse, identical_replies, length_spike, negative_kl,
         reward_up_similarity_down, kl_over_bound)


def failure_signs(history: list[dict], **limits) -> dict[str, str]:
    """{rule name: message} for every sign showing at the last step of ``history``."""
    out = {}
    for rule in RULES:
        msg = rule(history, **limits)
        if msg:
            out[rule.__name__] = msg
    return out
