"""Text features ψ(h, y, C) of a candidate reply y for the Q-heads (issue 19): nine cheap numbers computed from the
history h, the reply and the candidate set C it was drawn with, instead of (or beside) the frozen trunk's φ(h, y).

    psi = text_features(history, candidates)           # (N, 9) float32, columns named TEXT_FEATURES
    psi = text_features(history, candidates, pool=[0, 1, 2])   # consensus against candidates 0-2 only

Why these: on the 85 held-out OASST states of benchmarks/qlearn.py, with reward = ROUGE-L to the human reply, a
linear head on ψ captures about twice what one on 576 mean-pooled trunk dimensions does. The strongest is
*consensus* — a reply's mean similarity to the other samples of the policy, i.e. minimum-Bayes-risk decoding
(Kumar & Byrne 2004; "MBR" in Freitag et al. 2022): the expected similarity to a reply drawn from the policy, an
estimate of the similarity to *a* good reply. The others read how much of the user's words the reply takes up and
how long and repetitive it is.

  consensus_rouge   mean ROUGE-L F1 to the other replies of the pool
  consensus_f1      mean unigram F1 to the other replies of the pool
  rouge_user        ROUGE-L F1 to the last user turn
  overlap_user      share of the last user turn's content words (stop-words left out) that the reply uses
  rouge_history     ROUGE-L F1 to the whole history (every turn's text, joined)
  f1_history        unigram F1 to the whole history
  length            words / 32
  log_length        log(1 + words)
  distinct          distinct words / words (1 for an empty reply)

Words are lowercase runs of letters and apostrophes. The pool C is the set the consensus is taken over: the
policy's samples for this history (a candidate that is not a sample — the data's human reply — is compared with
the pool but not counted in it, so that it cannot lend its own similarity to the reference to the samples).
Pure functions of text: no model, no torch state.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import torch

from chatrlhf.rewards import rouge_l

TEXT_FEATURES = ("consensus_rouge", "consensus_f1", "rouge_user", "overlap_user", "rouge_history", "f1_history",
                 "length", "log_length", "distinct")
LENGTH_SCALE = 32.0  # words; the scale of `length` (replies of 32-48 tokens land near 1)
STOP_WORDS = frozenset("the a an and or to of in on for is are was were be it this that with as at by i you my your "
                       "me we our".split())
_WORD = re.compile(r"[a-z']+")


def words(text: str) -> list[str]:
    """Lowercase runs of letters and apostrophes."""
    return _WORD.findall(text.lower())


def unigram_f1(a: str, b: str) -> float:
    """F1 of the word multisets of a and b: 2·|a ∩ b| / (|a| + |b|), 0 when they share nothing."""
    ca, cb = Counter(words(a)), Counter(words(b))
    common = sum((ca & cb).values())
    return 0.0 if common == 0 else 2.0 * common / (sum(ca.values()) + sum(cb.values()))


def content_overlap(source: str, reply: str) -> float:
    """The share of the distinct non-stop-words of ``source`` that ``reply`` uses (0 when source has none)."""
    wanted = set(words(source)) - STOP_WORDS
    return len(wanted & set(words(reply))) / len(wanted) if wanted else 0.0


def last_user_turn(history: list[dict]) -> str:
    """The content of the history's last user message ("" when there is none)."""
    return next((m["content"] for m in reversed(history) if m.get("role") == "user"), "")


def consensus(candidates: list[str], pool: list[int]) -> tuple[list[float], list[float]]:
    """(mean ROUGE-L, mean unigram F1) of each candidate to the pool's members other than itself (0 with none).
    Both similarities are symmetric, so each pair is scored once."""
    rouge, f1 = {}, {}
    for i in range(len(candidates)):
        for j in pool:
            if i != j and (j, i) not in rouge:
                rouge[i, j] = rouge_l(candidates[j], candidates[i])
                f1[i, j] = unigram_f1(candidates[j], candidates[i])
    out_r, out_f = [], []
    for i in range(len(candidates)):
        others = [j for j in pool if j != i]
        pair = lambda table, j: table.get((i, j), table.get((j, i)))  # noqa: E731
        out_r.append(sum(pair(rouge, j) for j in others) / len(others) if others else 0.0)
        out_f.append(sum(pair(f1, j) for j in others) / len(others) if others else 0.0)
    return out_r, out_f


def text_features(history: list[dict], candidates: list[str], pool: list[int] | None = None) -> torch.Tensor:
    """(N, 9) float32 ψ(h, y_i, C) of the candidates of one history, columns TEXT_FEATURES; ``pool``: the indices of
    the candidates that form C for the consensus features (default: all of them)."""
    pool = list(range(len(candidates))) if pool is None else list(pool)
    if any(not 0 <= j < len(candidates) for j in pool):
        raise ValueError(f"pool {pool} indexes outside the {len(candidates)} candidates")
    user = last_user_turn(history)
    whole = " ".join(m["content"] for m in history)
    cons_rouge, cons_f1 = consensus(candidates, pool)
    rows = []
    for i, y in enumerate(candidates):
        w = words(y)
        rows.append([cons_rouge[i], cons_f1[i], rouge_l(user, y), content_overlap(user, y), rouge_l(whole, y),
                     unigram_f1(whole, y), len(w) / LENGTH_SCALE, math.log1p(len(w)),
                     len(set(w)) / len(w) if w else 1.0])
    return torch.tensor(rows, dtype=torch.float32).reshape(len(candidates), len(TEXT_FEATURES))


def grouped_text_features(histories: list[list[dict]], replies: list[str]) -> torch.Tensor:
    """(N, 9) ψ of (history, reply) pairs, the replies of one history (equal messages) forming one candidate set C,
    as at reranking: each history's N samples are its pool."""
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(histories):
        groups.setdefault(json.dumps(h, sort_keys=True, ensure_ascii=False), []).append(i)
    out = torch.zeros(len(replies), len(TEXT_FEATURES))
    for idx in groups.values():
        out[idx] = text_features(histories[idx[0]], [replies[i] for i in idx])
    return out
