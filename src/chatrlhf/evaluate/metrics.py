"""Metrics as pure functions on arrays (numpy), each with a hand-computed test."""

from __future__ import annotations

import numpy as np


def expected_calibration_error(p: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> float:
    """ECE (Guo et al. 2017): Σ_b |B_b|/N · |accuracy(B_b) − confidence(B_b)| over equal-width bins of
    the confidence p ∈ [0, 1]. For a reward model, p = σ(r_chosen − r_rejected) is the predicted
    probability that the human choice is the chosen one, and ``correct`` is 1 (the human chose it) —
    so we fold to confidence max(p, 1−p) and correctness (p > 0.5)."""
    p = np.asarray(p, dtype=float)
    correct = np.asarray(correct, dtype=float)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - p[sel].mean())
    return float(ece)


def pairwise_ece(logits: np.ndarray, n_bins: int = 10) -> float:
    """ECE of a reward model on held-out pairs, from the logit of its Bradley–Terry probability that the human
    chose the chosen reply: r_chosen − r_rejected on the raw (unnormalised) scale, minus the margin if the model
    was trained with margins. A logit of exactly 0 predicts nothing: confidence ½, counted half right."""
    z = np.asarray(logits, dtype=float)
    p = 1 / (1 + np.exp(-z))
    conf = np.maximum(p, 1 - p)
    return expected_calibration_error(conf, (z > 0) + 0.5 * (z == 0), n_bins)


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams / all word n-grams over the replies."""
    grams = [tuple(words[i:i + n]) for t in texts for words in [t.lower().split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bootstrap_ci(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap confidence interval of the mean."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
    tail = (1 - level) / 2 * 100
    return float(v.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def prompt_win_rates(a, b, n: int) -> list[float]:
    """Per prompt, the share of a's ``n`` replies that beat b's ``n`` replies, over all n × n pairs (a tie counts
    half). ``a`` and ``b`` hold the scores of n consecutive replies per prompt. Averaging within a prompt first
    lets a bootstrap over prompts give an honest interval (replies to one prompt are not independent)."""
    x, y = np.asarray(a, dtype=float).reshape(-1, n), np.asarray(b, dtype=float).reshape(-1, n)
    wins = (x[:, :, None] > y[:, None, :]) + 0.5 * (x[:, :, None] == y[:, None, :])
    return wins.mean((1, 2)).tolist()


def shared_reply_fraction(prompt_keys: list[str], texts: list[str]) -> float:
    """Share of the distinct (prompt, reply) pairs whose reply text is also given to another prompt — the sign of
    a policy that answers everything alike. Replies repeated for the same prompt (several samples each) are not
    counted: that is low entropy, which has its own warning."""
    owners: dict[str, set] = {}
    for key, text in zip(prompt_keys, texts):
        owners.setdefault(text.strip(), set()).add(key)
    pairs = {(key, text.strip()) for key, text in zip(prompt_keys, texts)}
    return sum(len(owners[text]) > 1 for _, text in pairs) / len(pairs) if pairs else 0.0
