"""`chatrlhf feedback queue` (active selection of what humans label) and `chatrlhf feedback simulate` (a simulated
annotator answering the app's queue with an oracle). The selection and the simulator live in feedback/active.py and
feedback/simulate.py; this module wires the reward model and the oracle to them, through cli/models_side.py —
imported only when a reward model or an oracle is given, so `feedback queue --strategy random` starts without
torch."""

from __future__ import annotations

import os

import httpx

from chatrlhf.config import FeedbackQueueConfig, FeedbackSimulateConfig
from chatrlhf.errors import UsageError
from chatrlhf.feedback.active import queue as queue_items
from chatrlhf.feedback.simulate import simulate as simulate_answers
from chatrlhf.feedback.store import Store


def run(sub: str, cfg) -> int:
    return {"queue": queue, "simulate": simulate}[sub](cfg)


def queue(cfg: FeedbackQueueConfig) -> int:
    if cfg.count < 1:
        raise UsageError(f"--count {cfg.count}: must be ≥ 1")
    if cfg.k < 1:
        raise UsageError(f"--k {cfg.k}: must be ≥ 1")
    if cfg.strategy != "random" and not cfg.reward_model:  # (before the store: a refused command writes nothing)
        raise UsageError(f"--strategy {cfg.strategy} ranks by the reward model's scores", "give --reward-model DIR")
    store = Store(cfg.db)
    scorer = None
    if cfg.reward_model:
        from chatrlhf.cli.models_side import reward_scorer

        scorer = reward_scorer(cfg.reward_model, cfg.strategy)
    out = queue_items(store, cfg.strategy, cfg.count, cfg.kind, scorer, cfg.k, cfg.round, cfg.seed)
    what = "pairs" if cfg.kind == "compare" else "replies"
    print(f"chatrlhf feedback: queued {out['queued']} {cfg.kind} items ({cfg.strategy}) of {out['candidates']} "
          f"candidate {what}; round {cfg.round}, k {cfg.k}")
    if out["margin_pool"] is not None:
        name = "margin" if cfg.kind == "compare" else "score"
        print(f"  mean |{name}|: chosen {_num(out['margin_chosen'])}, pool {_num(out['margin_pool'])}; "
              f"mean ensemble spread: chosen {_num(out['spread_chosen'])}, pool {_num(out['spread_pool'])}")
    return 0


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def simulate(cfg: FeedbackSimulateConfig) -> int:
    if not cfg.user:
        raise UsageError("--user is required", "an annotator's name; the password comes from CHATRLHF_PASSWORD")
    password = os.environ.get("CHATRLHF_PASSWORD")
    if not password:
        raise UsageError("CHATRLHF_PASSWORD is not set", f"export the password of {cfg.user} as CHATRLHF_PASSWORD")
    if not cfg.oracle:
        raise UsageError("--oracle is required", "module:function, e.g. --oracle examples/reward.py:politeness")
    from chatrlhf.cli.models_side import load_callable

    oracle = load_callable(cfg.oracle, "--oracle")
    if cfg.limit < 0:
        raise UsageError(f"--limit {cfg.limit}: must be ≥ 0 (0: until the queue is empty)")
    try:
        with client(cfg.url) as c:
            out = simulate_answers(c, cfg.user, password, oracle, cfg.noise, cfg.limit, cfg.seed)
    except httpx.HTTPError as e:
        raise UsageError(f"--url {cfg.url}: {type(e).__name__}: {e}", "start `chatrlhf feedback serve` first") from None
    rate = out["answers"] / out["seconds"] if out["seconds"] > 0 else 0.0
    print(f"chatrlhf feedback: {cfg.user} answered {out['answers']} items ({out['compare']} compare, {out['rate']} "
          f"rate; {out['refused']} already filled) in {out['seconds']:.1f} s, {rate:.1f} answers/s")
    return 0


def client(url: str) -> httpx.Client:
    """The HTTP client of the simulated annotator (a test replaces it with one bound to an in-process app)."""
    return httpx.Client(base_url=url, timeout=30)
