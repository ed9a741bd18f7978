"""Simulated annotators (issue 23): log in to a running `chatrlhf feedback serve` over HTTP and answer its queue with
an oracle reward, so the loop runs end to end with no human.

The oracle has the ``--reward-fn`` signature, ``oracle(prompts, responses) -> list[float]`` (prompts: message lists).
It goes through the app's own JSON API, as a script of a real annotator would: ``/api/login``, ``/api/next?kind=…``
(leases), ``/api/items/{id}`` (answers, with the CSRF token).

  compare   the reply the oracle scores higher wins; scores within 1e-9 → tie;
  rate      a fixed mapping of the score to 1–5 stars: round(1 + 4·σ(score)) (σ the logistic function), so 0 → 3,
            ±1 → 4 / 2, ±2 or beyond → 5 / 1 — the same reply always gets the same stars, whatever else is leased;
  correct   never leased (an oracle score cannot write a better reply), so they stay for people.

``noise`` P: with probability P (seeded) an answer is flipped — a ↔ b (a tie stays a tie), or the stars moved one
step (up or down at random, inward at 1 and 5).
"""

from __future__ import annotations

import math
import random
import time

import httpx

from chatrlhf.errors import UsageError

TIE = 1e-9
BATCH = 16  # items leased per request


def stars(score: float) -> int:
    """1–5 stars of an oracle score: round(1 + 4·σ(score)), halves rounded up."""
    return int(math.floor(1 + 4 / (1 + math.exp(-max(min(score, 50.0), -50.0))) + 0.5))


def choice(score_a: float, score_b: float) -> str:
    return "tie" if abs(score_a - score_b) <= TIE else "a" if score_a > score_b else "b"


def noisy(answer: dict, p: float, rng: random.Random) -> dict:
    """The answer flipped with probability ``p``: a ↔ b (a tie stays), or the stars one step up or down."""
    if p <= 0 or rng.random() >= p:
        return answer
    if "choice" in answer:
        return {"choice": {"a": "b", "b": "a"}.get(answer["choice"], answer["choice"])}
    s = answer["score"]
    step = -1 if s == 5 else 1 if s == 1 else rng.choice((-1, 1))
    return {"score": s + step}


def answers(oracle, items: list[dict]) -> list[dict]:
    """The oracle's answer to each leased item ({id, kind, messages, a, b}), in one oracle call."""
    prompts, responses = [], []
    for it in items:
        for text in ([it["a"], it["b"]] if it["kind"] == "compare" else [it["a"]]):
            prompts.append(it["messages"])
            responses.append(text)
    scores = [float(x) for x in oracle(prompts, responses)]
    if len(scores) != len(responses):
        raise UsageError(f"--oracle returned {len(scores)} scores for {len(responses)} replies",
                         "return one float per reply")
    out, i = [], 0
    for it in items:
        if it["kind"] == "compare":
            out.append({"choice": choice(scores[i], scores[i + 1])})
            i += 2
        else:
            out.append({"score": stars(scores[i])})
            i += 1
    return out


def log_in(client: httpx.Client, user: str, password: str) -> str:
    """Log in; the session's CSRF token."""
    r = client.post("/api/login", json={"name": user, "password": password})
    if r.status_code != 200:
        raise UsageError(f"log-in as {user!r} at {client.base_url} failed ({r.status_code}: {r.text[:200]})",
                         "check --user and CHATRLHF_PASSWORD, and that the user is an annotator")
    return r.json()["csrf"]


def simulate(client: httpx.Client, user: str, password: str, oracle, noise: float = 0.0, limit: int = 0,
             seed: int = 0) -> dict:
    """Answer the queue (compare, then rate items) until it is empty or ``limit`` answers (0: no limit) are
    stored. Returns {"answers": n, "compare": n, "rate": n, "refused": n, "seconds": s}; an item that someone else
    filled meanwhile (409) is counted as refused and not retried."""
    if not 0 <= noise <= 1:
        raise UsageError(f"--noise {noise}: a probability, 0–1")
    rng = random.Random(seed)  # nosec B311 (seeded simulated label errors)
    csrf = log_in(client, user, password)
    counts = {"answers": 0, "compare": 0, "rate": 0, "refused": 0}
    tried: set[int] = set()
    t0 = time.perf_counter()
    for kind in ("compare", "rate"):
        while not limit or counts["answers"] < limit:
            want = BATCH if not limit else min(BATCH, limit - counts["answers"])
            items = [it for it in _lease(client, kind, want) if it["id"] not in tried]
            if not items:
                break
            for it, answer in zip(items, answers(oracle, items)):
                tried.add(it["id"])
                r = client.post(f"/api/items/{it['id']}", json=noisy(answer, noise, rng), headers={"x-csrf-token": csrf})
                if r.status_code == 409:
                    counts["refused"] += 1
                elif r.status_code in (200, 201):
                    counts["answers"] += 1
                    counts[kind] += 1
                else:
                    raise UsageError(f"answering item {it['id']} failed ({r.status_code}: {r.text[:200]})")
    return {**counts, "seconds": time.perf_counter() - t0}


def _lease(client: httpx.Client, kind: str, count: int) -> list[dict]:
    r = client.get("/api/next", params={"kind": kind, "count": count})
    if r.status_code != 200:
        raise UsageError(f"leasing {kind} items failed ({r.status_code}: {r.text[:200]})",
                         "the user must be an annotator (or admin)")
    return r.json()["items"]
