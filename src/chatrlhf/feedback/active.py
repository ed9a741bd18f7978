"""Active selection: which replies that no one has been asked about yet become annotation items (issue 23).

Candidates (:func:`candidates`): for ``compare`` every two replies to the same prompt that no compare item holds yet
(in either order), wherever the replies came from — `chatrlhf serve --feedback-db` logs, imports, the app's
generated replies; for ``rate`` every reply without a rate item. Strategies (:func:`select`, a pure function of the
reward model's numbers):

  random        uniform, seeded;
  uncertainty   the smallest |margin|: compare — |r_a − r_b| of the reward model (the pairs it can least tell
                apart); rate — |r| of the normalised score, the replies nearest the model's decision boundary 0
                (its scores have mean 0 on reference replies: 0 is "an average reply");
  disagreement  the largest spread: the std over an ensemble's bootstrap heads of the margin (compare) or of the
                score (rate) — where heads trained on resamples of the labels disagree
                (`chatrlhf reward train --freeze-trunk --ensemble K`).

The store and the selection need no torch: the reward model's per-head scores come in as a callable
(reward_model.scored_heads, wired by the CLI), so the closed loop can call :func:`queue` with its own scorer.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
from sqlalchemy import select as sql

from chatrlhf.errors import UsageError
from chatrlhf.feedback.store import Store
from chatrlhf.feedback.tables import Item, Prompt, Reply

STRATEGIES = ("random", "uncertainty", "disagreement")
KINDS = ("compare", "rate")


def select(strategy: str, count: int, n: int, margins=None, spreads=None, seed: int = 0) -> list[int]:
    """Indices (into the ``n`` candidates) of the ``count`` to label, best first. ``margins`` (n,): the reward
    model's margin of each pair (or score of each reply); ``spreads`` (n,): the std of that over an ensemble's
    heads. Ties keep the candidates' order (a stable sort), so a selection is reproducible."""
    if strategy not in STRATEGIES:
        raise UsageError(f"--strategy {strategy!r}: not one of {', '.join(STRATEGIES)}")
    count = max(0, min(count, n))
    if strategy == "random":
        return np.random.default_rng(seed).permutation(n)[:count].tolist()
    values = margins if strategy == "uncertainty" else spreads
    if values is None:
        raise UsageError(f"--strategy {strategy} needs the reward model's "
                         f"{'margins' if strategy == 'uncertainty' else 'ensemble spreads'}", "give --reward-model")
    values = np.asarray(values, dtype=float)
    if len(values) != n:
        raise ValueError(f"{len(values)} values for {n} candidates")
    key = np.abs(values) if strategy == "uncertainty" else -values
    return np.argsort(key, kind="stable")[:count].tolist()


def margins_and_spreads(heads_a: np.ndarray, heads_b: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(margin, spread) per candidate from (N, K) per-head scores: with ``heads_b`` (pairs) the mean over heads of
    a − b and the std over heads of a − b (population std, as reward_model.ensemble_scores: the heads are the
    whole ensemble); without (single replies) the mean and std of the score. The margin's spread is not
    √(s_a² + s_b²): heads that over-score a reply tend to over-score its sibling too."""
    d = np.asarray(heads_a, dtype=float) - (0.0 if heads_b is None else np.asarray(heads_b, dtype=float))
    return d.mean(1), d.std(1)


# --------------------------------------------------------------------------- the store's side


def candidates(store: Store, kind: str) -> list[tuple[int, ...]]:
    """The not-yet-queued candidates, in id order: compare — (reply a, reply b) of one prompt with no compare item
    of the two; rate — (reply,) with no rate item."""
    if kind not in KINDS:
        raise UsageError(f"--kind {kind!r}: not one of {', '.join(KINDS)}")
    with store.reading() as s:
        return _candidates(s, kind)


def _candidates(s, kind: str) -> list[tuple[int, ...]]:
    queued = {tuple(sorted(x for x in (a, b) if x is not None)) for a, b in
              s.execute(sql(Item.reply_a_id, Item.reply_b_id).where(Item.kind == kind)).all()}
    replies = s.execute(sql(Reply.prompt_id, Reply.id).order_by(Reply.prompt_id, Reply.id)).all()
    if kind == "rate":
        return [(r,) for _, r in replies if (r,) not in queued]
    by_prompt: dict[int, list[int]] = {}
    for prompt_id, reply_id in replies:
        by_prompt.setdefault(prompt_id, []).append(reply_id)
    return [pair for ids in by_prompt.values() for pair in combinations(ids, 2) if pair not in queued]


def texts(store: Store, reply_ids: list[int]) -> tuple[list[list[dict]], list[str]]:
    """(prompt messages, reply text) of each reply, in the order given."""
    with store.reading() as s:
        rows = {r.id: (r.messages, r.text) for r in s.execute(
            sql(Reply.id, Reply.text, Prompt.messages).join(Prompt, Prompt.id == Reply.prompt_id)
            .where(Reply.id.in_(set(reply_ids))))}
    return [rows[i][0] for i in reply_ids], [rows[i][1] for i in reply_ids]


def add_items(store: Store, kind: str, chosen: list[tuple[int, ...]], k: int = 1, round: int = 0) -> list[int]:
    """The chosen candidates as items, in one write transaction that first re-reads what is queued (SQLite: after
    BEGIN IMMEDIATE): a candidate queued meanwhile by another `feedback queue` is left out, so no pair is ever
    queued twice."""
    with store.transaction(), store.session() as s:
        still = set(_candidates(s, kind))
        return [store.add_item(kind, c[0], c[1] if kind == "compare" else None, k=k, round=round)
                for c in chosen if tuple(c) in still]


def queue(store: Store, strategy: str, count: int, kind: str = "compare", scorer=None, k: int = 1, round: int = 0,
          seed: int = 0) -> dict:
    """Choose ``count`` candidates by ``strategy`` and queue them as items. ``scorer(prompts, responses)`` → (N, K)
    per-head scores of the reward model (reward_model.scored_heads); needed by uncertainty and disagreement
    (K ≥ 2 for disagreement), optional for random (then the summary reports margins too). Returns {candidates,
    queued, items, margin_chosen, margin_pool, spread_chosen, spread_pool} (means of |margin| and spread; None
    without a scorer)."""
    if strategy not in STRATEGIES:
        raise UsageError(f"--strategy {strategy!r}: not one of {', '.join(STRATEGIES)}")
    if strategy != "random" and scorer is None:
        raise UsageError(f"--strategy {strategy} ranks by the reward model's scores", "give --reward-model DIR")
    pool = candidates(store, kind)
    margins = spreads = None
    if scorer is not None and pool:
        margins, spreads = _score(store, pool, scorer, strategy)
    chosen = select(strategy, count, len(pool), margins, spreads, seed)
    items = add_items(store, kind, [pool[i] for i in chosen], k, round)

    def mean(values, idx):
        return float(np.mean(np.abs(np.asarray(values)[idx]))) if values is not None and len(idx) else None

    everyone = list(range(len(pool)))
    return {"candidates": len(pool), "queued": len(items), "items": items,
            "margin_chosen": mean(margins, chosen), "margin_pool": mean(margins, everyone),
            "spread_chosen": mean(spreads, chosen), "spread_pool": mean(spreads, everyone)}


def _score(store: Store, pool: list[tuple[int, ...]], scorer, strategy: str) -> tuple[np.ndarray, np.ndarray]:
    """(margin, spread) of every candidate: each distinct reply scored once."""
    ids = sorted({r for c in pool for r in c})
    prompts, responses = texts(store, ids)
    heads = np.asarray(scorer(prompts, responses), dtype=float).reshape(len(ids), -1)
    if strategy == "disagreement" and heads.shape[1] < 2:
        raise UsageError("--strategy disagreement needs a reward model with an ensemble (it has one head)",
                         "train one with `chatrlhf reward train --freeze-trunk --ensemble 5`, or use "
                         "--strategy uncertainty")
    row = {r: i for i, r in enumerate(ids)}
    a = heads[[row[c[0]] for c in pool]]
    b = heads[[row[c[1]] for c in pool]] if len(pool[0]) == 2 else None
    return margins_and_spreads(a, b)
