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


def fit_temperature(logits: np.ndarray, span: float = 1e3, iters: int = 100) -> float:
    """Temperature scaling (Guo et al. 2017) for pairs: the T within a factor ``span`` either side of the logits'
    mean |z| (raw scores have no fixed scale: a fresh head's differ by hundredths) that minimises the Bradley–Terry
    log-loss of σ(z / T) for the logits z (chosen − rejected) of n decided pairs, with Platt's (1999) target
    (n + 1) / (n + 2) for "the chosen reply wins" instead of 1, so that a small held-out set the model gets all
    right does not drive T to 0 (certainty). The loss is convex in 1/T, so a golden-section search on log T finds
    its minimum; no gradient, no closed form needed."""
    z = np.asarray(logits, dtype=float)
    scale = float(np.abs(z).mean()) if len(z) else 0.0
    if scale == 0:
        return 1.0
    target = (len(z) + 1) / (len(z) + 2)
    loss = lambda log_t: float((target * np.logaddexp(0.0, -z / np.exp(log_t))  # noqa: E731
                                + (1 - target) * np.logaddexp(0.0, z / np.exp(log_t))).mean())
    a, b = np.log(scale / span), np.log(scale * span)
    g = (np.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = loss(d)
    return float(np.exp((a + b) / 2))


def confident_half(right: np.ndarray, head_margins: np.ndarray) -> dict:
    """Accuracy on the half of the pairs the ensemble is surest of against the other half: surest = the largest
    |mean of the heads' margins|, the ensemble's probability σ(mean / T) furthest from ½. Also the same split by the
    heads' agreement, |mean| / std of their margins (``agreed_half_accuracy``, ``other_agreed_accuracy``). On the
    training pairs, by 5-fold cross-validation, |mean| separates more than agreement on HH and on OpenAssistant
    (docs/benchmarks.md); the spread alone would pick pairs whose replies look alike to the trunk (small margins, small
    spread), the hard ones. ``right``: (N,) 1 right, 0 wrong, ½ an exact tie; ``head_margins``: (N, K) chosen −
    rejected per head."""
    m = np.asarray(head_margins, dtype=float)
    spread = m.std(1)
    right = np.asarray(right, dtype=float)

    def split(confidence: np.ndarray) -> tuple[float, float]:
        order = np.argsort(-confidence, kind="stable")
        sure, rest = order[:len(order) // 2], order[len(order) // 2:]
        return (float(right[sure].mean()) if len(sure) else float("nan"),
                float(right[rest].mean()) if len(rest) else float("nan"))

    surest, agreed = split(np.abs(m.mean(1))), split(np.abs(m.mean(1)) / np.maximum(spread, 1e-12))
    return {"heads": int(m.shape[1]), "confident_pairs": len(m) // 2, "other_pairs": len(m) - len(m) // 2,
            "confident_half_accuracy": surest[0], "other_half_accuracy": surest[1],
            "agreed_half_accuracy": agreed[0], "other_agreed_accuracy": agreed[1],
            "mean_margin_spread": float(spread.mean())}


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
