"""Active selection (`feedback queue`) and simulated annotators (`feedback simulate`), issue 23: the selection's
numbers worked by hand, the store's candidates and idempotent queueing, and a real `feedback serve` answered by a
hand-written oracle over HTTP."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select as sql

from chatrlhf.errors import UsageError
from chatrlhf.feedback.active import candidates, margins_and_spreads, queue, select
from chatrlhf.feedback.simulate import choice, noisy, stars
from chatrlhf.feedback.store import Store
from chatrlhf.feedback.tables import Comparison, Item, Rating
from conftest import feedback_app, run_cli

# --------------------------------------------------------------------------- pure selection, by hand

MARGINS = [0.5, -0.1, 2.0, 0.1, -3.0]   # |m| = .5 .1 2 .1 3
SPREADS = [0.2, 0.9, 0.1, 0.9, 0.5]


def test_uncertainty_takes_the_smallest_absolute_margins_ties_in_order():
    assert select("uncertainty", 3, 5, MARGINS) == [1, 3, 0]
    assert select("uncertainty", 9, 5, MARGINS) == [1, 3, 0, 2, 4]  # never more than the candidates


def test_disagreement_takes_the_largest_spreads_ties_in_order():
    assert select("disagreement", 2, 5, spreads=SPREADS) == [1, 3]
    assert select("disagreement", 3, 5, MARGINS, SPREADS) == [1, 3, 4]


def test_random_is_seeded_distinct_and_in_range():
    a = select("random", 3, 10, seed=1)
    assert a == select("random", 3, 10, seed=1) and len(set(a)) == 3 and all(0 <= i < 10 for i in a)
    assert sorted(select("random", 10, 10, seed=2)) == list(range(10))
    assert any(select("random", 3, 10, seed=s) != a for s in range(2, 6))


def test_selection_without_the_numbers_it_needs_says_which_flag():
    with pytest.raises(UsageError, match="--reward-model"):
        select("uncertainty", 1, 5)
    with pytest.raises(UsageError, match="--strategy 'best'"):
        select("best", 1, 5)


def test_margin_spread_is_the_std_over_heads_of_the_difference():
    # heads a [[1, 3], [0, 0]], b [[0, 1], [1, -1]] → a − b = [[1, 2], [-1, 1]]: mean [1.5, 0], std [0.5, 1]
    m, s = margins_and_spreads(np.array([[1.0, 3.0], [0.0, 0.0]]), np.array([[0.0, 1.0], [1.0, -1.0]]))
    assert m.tolist() == [1.5, 0.0] and s.tolist() == [0.5, 1.0]
    m, s = margins_and_spreads(np.array([[1.0, 3.0]]))  # one reply: its score's mean and spread
    assert m.tolist() == [2.0] and s.tolist() == [1.0]


# --------------------------------------------------------------------------- the store: candidates, idempotence

SCORES = {"r1": 0.0, "r2": 1.0, "r3": 0.9, "r4": -2.0, "solo": 0.3}


def scorer(heads: int = 2):
    """Per-head scores: the table's score, head k adding ±k/10 (so the spread of a reply's score is known)."""
    def score(prompts, responses):
        return np.array([[SCORES[r] + (k - (heads - 1) / 2) / 10 for k in range(heads)] for r in responses])
    return score


@pytest.fixture()
def filled(tmp_path):
    """One prompt with four replies (r1–r2 already a compare item), another with one."""
    store = Store(str(tmp_path / "fb.db"))
    p = store.add_prompt([{"role": "user", "content": "Hi?"}])
    ids = {t: store.add_reply(p, t) for t in ("r1", "r2", "r3", "r4")}
    ids["solo"] = store.add_reply(store.add_prompt([{"role": "user", "content": "Alone?"}]), "solo")
    store.add_item("compare", ids["r2"], ids["r1"])  # the reverse order counts as the same pair
    return store, ids


def test_candidates_are_unqueued_pairs_of_one_prompt_and_unrated_replies(filled):
    store, ids = filled
    r1, r2, r3, r4 = (ids[t] for t in ("r1", "r2", "r3", "r4"))
    assert candidates(store, "compare") == [(r1, r3), (r1, r4), (r2, r3), (r2, r4), (r3, r4)]
    assert candidates(store, "rate") == [(i,) for i in ids.values()]


def test_uncertainty_queues_the_closest_pair_and_never_a_pair_twice(filled):
    store, ids = filled
    # margins: r1−r3 −0.9, r1−r4 2, r2−r3 0.1, r2−r4 3, r3−r4 2.9 → the closest is (r2, r3)
    out = queue(store, "uncertainty", 1, "compare", scorer(), k=2, round=3)
    assert out["queued"] == 1 and out["candidates"] == 5
    with store.reading() as s:
        item = s.get(Item, out["items"][0])
        assert (item.reply_a_id, item.reply_b_id, item.k, item.round) == (ids["r2"], ids["r3"], 2, 3)
    assert out["margin_chosen"] == pytest.approx(0.1) and out["margin_pool"] == pytest.approx((.9 + 2 + .1 + 3 + 2.9) / 5)
    assert queue(store, "random", 10, "compare")["queued"] == 4  # the rest, once
    assert queue(store, "random", 10, "compare") == {"candidates": 0, "queued": 0, "items": [], "margin_chosen": None,
                                                     "margin_pool": None, "spread_chosen": None, "spread_pool": None}


def test_rate_uncertainty_is_the_score_nearest_zero_and_disagreement_needs_heads(filled):
    store, ids = filled
    out = queue(store, "uncertainty", 2, "rate", scorer())
    with store.reading() as s:
        assert [s.get(Item, i).reply_a_id for i in out["items"]] == [ids["r1"], ids["solo"]]
    with pytest.raises(UsageError, match="--ensemble"):
        queue(store, "disagreement", 1, "rate", scorer(heads=1))
    with pytest.raises(UsageError, match="--reward-model"):
        queue(store, "uncertainty", 1, "rate")


def test_queue_command_prints_what_it_queued_and_refuses_a_model_less_ranking(filled):
    store, _ = filled
    db = store.url.removeprefix("sqlite:///")
    r = run_cli("feedback", "queue", "--db", db, "--strategy", "random", "--count", "2", "--seed", "3")
    assert r.returncode == 0 and "queued 2 compare items (random) of 5 candidate pairs" in r.stdout, r.stderr
    r = run_cli("feedback", "queue", "--db", db, "--strategy", "uncertainty")
    assert r.returncode == 2 and "--reward-model" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- simulated annotators


def test_stars_choice_and_noise_by_hand():
    assert [stars(x) for x in (-9, -2, -1, 0, 1, 2, 9)] == [1, 1, 2, 3, 4, 5, 5]  # 1+4σ: 1.48 2.08 3 3.92 4.52
    assert (choice(1.0, 1.0 + 1e-12), choice(2.0, 1.0), choice(0.0, 0.5)) == ("tie", "a", "b")
    import random

    rng = random.Random(0)
    assert noisy({"choice": "a"}, 1.0, rng) == {"choice": "b"} and noisy({"choice": "tie"}, 1.0, rng) == {"choice": "tie"}
    assert noisy({"score": 5}, 1.0, rng) == {"score": 4} and noisy({"score": 1}, 1.0, rng) == {"score": 2}
    assert noisy({"choice": "a"}, 0.0, rng) == {"choice": "a"}
    flips = sum(noisy({"choice": "a"}, 0.3, rng)["choice"] == "b" for _ in range(2000))
    assert 500 < flips < 700  # ≈ 0.3 · 2000


ORACLE = "def oracle(prompts, responses):\n    return [float(len(r)) - 5 for r in responses]\n"  # length − 5


def test_simulate_answers_a_real_server_exactly_as_the_oracle_says(tmp_path, write, monkeypatch):
    """`feedback serve` in its own process on a SQLite file with imported items; `feedback simulate` answers every
    compare and rate item over HTTP (a correct item is left alone), and the store holds the oracle's answers."""
    db = tmp_path / "fb.db"
    store = Store(str(db))
    store.add_user("sim", "correct horse")
    texts = [("aaaa", "bbbbbbb"), ("ccccccc", "dd"), ("eee", "fff")]  # length − 5: a −1 b 2 → b; c 2 d −3 → a; tie
    compares = []
    for i, (a, b) in enumerate(texts):
        p = store.add_prompt([{"role": "user", "content": f"q{i}"}])
        compares.append(store.add_item("compare", store.add_reply(p, a), store.add_reply(p, b)))
    p = store.add_prompt([{"role": "user", "content": "rate"}])
    rates = [store.add_item("rate", store.add_reply(p, t)) for t in ("a", "abcde", "abcdefghij")]  # −4 0 5
    store.add_item("correct", store.add_reply(p, "fix me"))
    with feedback_app(db) as app:
        url = app["url"]
        monkeypatch.setenv("CHATRLHF_PASSWORD", "correct horse")
        r = run_cli("feedback", "simulate", "--url", url, "--user", "sim", "--oracle", f"{write('oracle.py', ORACLE)}:oracle")
        assert r.returncode == 0, r.stderr
        assert "answered 6 items (3 compare, 3 rate" in r.stdout and "answers/s" in r.stdout
        monkeypatch.setenv("CHATRLHF_PASSWORD", "wrong password")
        bad = run_cli("feedback", "simulate", "--url", url, "--user", "sim", "--oracle", f"{tmp_path}/oracle.py:oracle")
        assert bad.returncode == 2 and "log-in as 'sim'" in bad.stderr and "Traceback" not in bad.stderr
    with store.reading() as s:
        assert sorted(s.execute(sql(Comparison.item_id, Comparison.choice)).all()) == \
            list(zip(compares, ("b", "a", "tie")))
        assert sorted(s.execute(sql(Rating.item_id, Rating.score)).all()) == list(zip(rates, (1.0, 3.0, 5.0)))
    assert store.progress() == {"answers": 6, "needed": 7}  # the correct item waits for a person
