"""How well a Q-function ranks candidate replies — the statistics of QLEARN.md §2.7, shared by `chatrlhf qlearn`
and `chatrlhf qlearn-offline` (pure functions on plain numbers: no model, no torch).

One evaluated state is a :class:`ScoredSet`: the candidates' Q values, their true rewards, their lengths (words) and
the group it belongs to (its dialogue, or its prompt), over which the bootstrap resamples — states of one dialogue
are not independent.

    sets = [ScoredSet(q=[0.2, 0.9], reward=[0.1, 0.5], length=[3, 7], group=0), ...]
    set_statistics(sets, seed=0)   # {"eval/q": …, "eval/capture": …, "eval/capture_lo": …, "eval/kendall_tau": …}
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

N_BOOTSTRAP = 1000  # resamples for the 95 % interval (Efron & Tibshirani: 1000 for percentile intervals)


@dataclass
class ScoredSet:
    """One state's candidates: Q (what ranks them), reward (the truth), length in words, and its group."""
    q: list[float]
    reward: list[float]
    length: list[int]
    group: int = 0

    @property
    def pick(self) -> int:
        """The Q-argmax candidate (the first of equal maxima)."""
        return int(np.argmax(self.q))


def capture(q: float, random: float, oracle: float) -> float | None:
    """(Q − random) / (oracle − random): the share of the oracle's gain over a random pick that the Q pick gets;
    None when the oracle gains nothing (every candidate scored alike)."""
    gap = oracle - random
    return (q - random) / gap if gap > 1e-9 else None


def _sums(sets: list[ScoredSet]) -> tuple[np.ndarray, np.ndarray]:
    """(groups, 3) sums of the Q pick's, a random pick's (the mean) and the oracle's reward, and (groups,) state
    counts, the groups numbered in order of first appearance."""
    ids = {s.group: None for s in sets}
    index = {g: i for i, g in enumerate(ids)}
    sums, counts = np.zeros((len(index), 3)), np.zeros(len(index))
    for s in sets:
        r = np.asarray(s.reward, dtype=float)
        sums[index[s.group]] += (r[s.pick], r.mean(), r.max())
        counts[index[s.group]] += 1
    return sums, counts


def bootstrap_capture(sets: list[ScoredSet], seed: int = 0, n: int = N_BOOTSTRAP,
                      level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the capture, resampling whole groups (dialogues) with replacement, from
    ``np.random.default_rng(seed)``; resamples whose oracle gains nothing are left out. None when fewer than two
    groups, or fewer than half of the resamples have a capture."""
    if not sets:
        return None
    sums, _ = _sums(sets)
    if len(sums) < 2:
        return None
    draws = np.random.default_rng(seed).integers(0, len(sums), size=(n, len(sums)))
    q, random, oracle = (sums[draws, k].sum(1) for k in range(3))  # the state counts cancel in the ratio
    gap = oracle - random
    ok = gap > 1e-9
    if ok.sum() < n / 2:
        return None
    values = (q[ok] - random[ok]) / gap[ok]
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def pairwise_accuracy(q: list[float], reward: list[float]) -> tuple[float, int]:
    """(agreeing pairs, pairs) over the pairs of one set whose rewards differ: a pair agrees when Q orders it as
    the reward does; a Q tie counts one half."""
    agree, pairs = 0.0, 0
    for i in range(len(q)):
        for j in range(i + 1, len(q)):
            if reward[i] == reward[j]:
                continue
            pairs += 1
            s = (q[i] - q[j]) * (reward[i] - reward[j])
            agree += 1.0 if s > 0 else 0.5 if q[i] == q[j] else 0.0
    return agree, pairs


def kendall_tau(x: list[float], y: list[float]) -> float | None:
    """Kendall's τ-b (ties corrected, as scipy.stats.kendalltau): (C − D) / √((n₀ − t_x)(n₀ − t_y)) with C, D the
    concordant and discordant pairs, n₀ all pairs, t_x, t_y the pairs tied in x, in y. None when x or y is constant."""
    c = d = tx = ty = n0 = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            n0 += 1
            dx, dy = x[i] - x[j], y[i] - y[j]
            tx += dx == 0
            ty += dy == 0
            c += dx * dy > 0
            d += dx * dy < 0
    denom = math.sqrt((n0 - tx) * (n0 - ty))
    return (c - d) / denom if denom > 0 else None


def ranks(x: list[float]) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="stable")
    out = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        out[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's ρ: Pearson's correlation of the (average-tie) ranks. None when x or y is constant."""
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx ** 2).sum() * (ry ** 2).sum()))
    return float((rx * ry).sum()) / denom if denom > 0 else None


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def set_statistics(sets: list[ScoredSet], seed: int = 0, n_bootstrap: int = N_BOOTSTRAP) -> dict[str, float]:
    """The eval/… figures of QLEARN §2.7 over evaluated states: mean reward of the Q pick, a random pick and the
    oracle pick, capture and its bootstrap 95 % interval over groups, within-set pairwise accuracy (pooled over
    pairs) and Kendall τ (mean over sets) of Q against the reward, the mean length of the Q pick and of a random
    pick, and Spearman(Q, length) within sets (mean). Figures that are undefined are left out (never NaN)."""
    if not sets:
        return {}
    sums, counts = _sums(sets)
    q, random, oracle = sums.sum(0) / counts.sum()
    out = {"eval/q": float(q), "eval/random": float(random), "eval/oracle": float(oracle), "eval/states": len(sets)}
    agree, pairs = map(sum, zip(*(pairwise_accuracy(s.q, s.reward) for s in sets)))
    figures = {"eval/capture": capture(q, random, oracle), "eval/pair_accuracy": agree / pairs if pairs else None,
               "eval/kendall_tau": _mean([kendall_tau(s.q, s.reward) for s in sets]),
               "eval/length_q": float(np.mean([s.length[s.pick] for s in sets])),
               "eval/length_random": float(np.mean([np.mean(s.length) for s in sets])),
               "eval/spearman_q_length": _mean([spearman(s.q, s.length) for s in sets])}
    ci = bootstrap_capture(sets, seed, n_bootstrap)
    if ci is not None:
        figures["eval/capture_lo"], figures["eval/capture_hi"] = ci
    out.update({k: float(v) for k, v in figures.items() if v is not None})
    return out
