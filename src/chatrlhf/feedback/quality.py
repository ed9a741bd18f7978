"""Quality control: inter-annotator agreement and per-annotator reliability.

Krippendorff's α is computed here (the PyPI package is GPL-3.0; α is a few lines); Cohen's κ comes from
scikit-learn. Reliability is an annotator's smoothed accuracy on gold items, (correct + 1) / (answered + 2):
0.5 for someone not yet tested, near 1 for someone who gets the gold items right.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import combinations

from sqlalchemy import select

from chatrlhf.feedback.tables import Comparison, Item, Rating


def krippendorff_alpha(units: list[list], metric: str = "nominal") -> float | None:
    """α over units (each the list of values the annotators gave it; missing values left out).
    ``metric``: nominal (δ = [c ≠ k]) or interval (δ = (c − k)²). None when undefined (no pairable values
    or a single category)."""
    coincidence: dict[tuple, float] = defaultdict(float)
    for values in units:
        m = len(values)
        if m < 2:
            continue
        for i, c in enumerate(values):
            for j, k in enumerate(values):
                if i != j:
                    coincidence[(c, k)] += 1.0 / (m - 1)
    n_c: dict = defaultdict(float)
    for (c, _), o in coincidence.items():
        n_c[c] += o
    n = sum(n_c.values())

    def delta(c, k):
        return float(c != k) if metric == "nominal" else (float(c) - float(k)) ** 2

    observed = sum(o * delta(c, k) for (c, k), o in coincidence.items())
    expected = sum(n_c[c] * n_c[k] * delta(c, k) for c in n_c for k in n_c)
    if n <= 1 or expected == 0:
        return None
    return 1.0 - (n - 1) * observed / expected


def agreement(store) -> dict:
    """Krippendorff's α on comparisons (nominal) and star ratings (interval), and the mean pairwise Cohen's κ
    on comparisons between annotators with at least 5 items in common."""
    from sklearn.metrics import cohen_kappa_score

    with store.reading() as s:
        votes, stars = defaultdict(dict), defaultdict(dict)
        for c in s.scalars(select(Comparison)):
            votes[c.item_id][c.user_id] = c.choice
        for r in s.scalars(select(Rating).where(Rating.score.is_not(None))):
            stars[r.item_id][r.user_id] = r.score
    kappas = []
    users = {u for v in votes.values() for u in v}
    for u, w in combinations(sorted(users), 2):
        common = [v for v in votes.values() if u in v and w in v]
        if len(common) >= 5:
            a, b = [v[u] for v in common], [v[w] for v in common]
            if len(set(a) | set(b)) > 1:
                kappas.append(float(cohen_kappa_score(a, b)))
    return {"alpha_comparisons": krippendorff_alpha([list(v.values()) for v in votes.values()]),
            "alpha_ratings": krippendorff_alpha([list(v.values()) for v in stars.values()], "interval"),
            "kappa_comparisons": sum(kappas) / len(kappas) if kappas else None,
            "items_with_2plus_votes": sum(len(v) >= 2 for v in votes.values()) + sum(len(v) >= 2 for v in stars.values())}


def gold_correct(item: Item, answer) -> bool:
    """Does an answer match a gold item's known answer? Compare: same choice; rate: within one star."""
    gold = item.gold or {}
    if item.kind == "compare":
        return answer.choice == gold.get("choice")
    if item.kind == "rate" and answer.score is not None and "score" in gold:
        return abs(answer.score - gold["score"]) <= 1
    return False


def reliability(store) -> dict[int, float]:
    """{user id: (correct gold answers + 1) / (gold answers + 2)} for every user who answered anything."""
    tally: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    with store.reading() as s:
        gold = {i.id: i for i in s.scalars(select(Item).where(Item.gold.is_not(None)))}
        for table in (Comparison, Rating):
            for a in s.scalars(select(table)):
                t = tally[a.user_id]
                if a.item_id in gold:
                    t[0] += gold_correct(gold[a.item_id], a)
                    t[1] += 1
    return {u: (c + 1) / (n + 2) for u, (c, n) in tally.items()}
