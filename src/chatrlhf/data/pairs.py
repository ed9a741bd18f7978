"""Preference pairs for reward-model training from the three kinds of human feedback.

* Preferences are used as they are. ``tie`` pairs train toward equal scores (or are dropped with
  ``ties="drop"``); ``both_bad`` pairs are kept and train as ties by default — "neither is good"
  says nothing about which is better — or are dropped with ``both_bad="drop"``. Either way they are
  counted, never silently lost.
* Ratings become pairs: for one prompt and one scale (1–5 stars, or thumbs), every two replies with
  different scores make a pair, the higher-rated one chosen; equal scores make no pair. Pair weight
  is the mean of the two ratings' weights divided by C(K, 2) for the K ratings of that prompt, so that a
  prompt counts once however many replies were rated (InstructGPT §3.5: the K(K−1)/2 comparisons of one
  prompt as independent examples overfit). (We chose pairs over a regression on the normalised score:
  annotators' absolute levels drift, their orderings agree far better, and pairs share the
  Bradley–Terry loss with the other sources.)
* Corrections: the corrected reply is preferred to the original.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from itertools import combinations

from chatrlhf.data.formats import load_records
from chatrlhf.data.records import Correction, Preference, Rating, prompt_key
from chatrlhf.data.split import group_hash, split_by_prompt
from chatrlhf.errors import UsageError

SOURCES = ("preference", "rating", "correction")
HELD_OUT = "held-out"  # how a measurement on pairs no model trained on is labelled (the reward gate checks it)


def rating_pairs(ratings: list[Rating]) -> list[Preference]:
    groups: dict[tuple[str, str], list[Rating]] = {}
    for r in ratings:
        groups.setdefault((prompt_key(r.prompt), r.scale), []).append(r)
    pairs = []
    for group in groups.values():
        n_pairs = len(group) * (len(group) - 1) // 2  # C(K, 2)
        for a, b in combinations(group, 2):
            if a.score == b.score or a.response.strip() == b.response.strip():
                continue
            hi, lo = (a, b) if a.score > b.score else (b, a)
            pairs.append(Preference(hi.prompt, hi.response, lo.response, weight=(hi.weight + lo.weight) / 2 / n_pairs,
                                    annotator=hi.annotator if hi.annotator == lo.annotator else "",
                                    round=max(hi.round, lo.round), source="rating", where=f"{hi.where} + {lo.where}"))
    return pairs


def build_pairs(records: list, source_weights: dict[str, float] | None = None, ties: str = "train",
                both_bad: str = "tie") -> tuple[list[Preference], Counter]:
    """All records as weighted preference pairs, and counts of what was used or dropped."""
    weights = source_weights or {}
    counts: Counter = Counter()
    pairs: list[Preference] = []
    ratings = [r for r in records if isinstance(r, Rating)]
    for r in records:
        if isinstance(r, Correction):
            pairs.append(r.as_preference())
        elif isinstance(r, Preference):
            pairs.append(replace(r, source=r.source or "preference"))
    pairs += rating_pairs(ratings)
    out = []
    for p in pairs:
        kind = "correction" if p.source == "correction" else "rating" if p.source == "rating" else "preference"
        if p.both_bad:
            counts["both_bad"] += 1
            if both_bad == "drop":
                counts["dropped_both_bad"] += 1
                continue
            p = replace(p, tie=True)
        elif p.tie:
            counts["ties"] += 1
            if ties == "drop":
                counts["dropped_ties"] += 1
                continue
        w = p.weight * weights.get(kind, 1.0)
        if w <= 0:
            counts[f"dropped_{kind}_weight0"] += 1
            continue
        counts[kind] += 1
        out.append(replace(p, weight=w, source=p.source or kind))
    return out, counts


def source_of(p: Preference) -> str:
    return "correction" if p.source == "correction" else "rating" if p.source == "rating" else "preference"


# --------------------------------------------------------------------------- the pairs a trainer reads
# `reward train` and `dpo` read their --data / --eval-data the same way: every record format, ties and both-bad
# pairs per --ties / --both-bad, pair weights times --source-weights. ``cfg`` has those fields and --format.


def load_feedback(paths: list[str], fmt: str = "auto", log=print, command: str = "reward") -> list:
    """Every record of every file; the problems the readers found (skipped rows) are printed, ten per file."""
    records = []
    for path in paths:
        loaded = load_records(path, fmt)
        records += loaded.of("preference")  # OpenAssistant trees: their rank pairs
        for p in loaded.problems[:10]:
            log(f"chatrlhf {command}: {p.where}: {p.message}")
        if len(loaded.problems) > 10:
            log(f"chatrlhf {command}: … and {len(loaded.problems) - 10} more problems in {path}")
    return records


def load_pairs(paths: list[str], cfg, log=print, command: str = "reward"):
    """Weighted pairs from every file (with the problems the readers found), and what was used or dropped."""
    unknown = sorted(set(cfg.source_weights) - set(SOURCES))
    if unknown:  # flags are checked before any data is read
        raise UsageError(f"--source-weights: unknown source '{unknown[0]}'", f"sources are {', '.join(SOURCES)}")
    records = load_feedback(paths, cfg.format, log, command)
    pairs, counts = build_pairs(records, cfg.source_weights, cfg.ties, cfg.both_bad)
    if not pairs:
        raise UsageError(f"--data {','.join(paths)}: no preference pairs", "give preferences, ratings or corrections")
    return pairs, counts


def split_pairs(cfg, command: str = "reward", log=print) -> tuple[list, list, Counter, str]:
    """(train pairs, held-out pairs, counts, how the held-out pairs were chosen): see :func:`split_held_out`."""
    return split_held_out(cfg, lambda paths: load_pairs(paths, cfg, log, command), "pairs", command, log)


def split_held_out(cfg, load, what: str, command: str, log=print) -> tuple[list, list, Counter, str]:
    """(train records, held-out records, counts, how the held-out records were chosen) of ``load(paths)`` →
    (records, counts). Held-out records come from --eval-data (minus any whose prompt is also in training), else a
    prompt-disjoint --eval-fraction split of --data."""
    records, counts = load(cfg.data)
    if cfg.eval_data:
        held, _ = load(cfg.eval_data)
        trained = {group_hash(p) for p in records}
        kept = [p for p in held if group_hash(p) not in trained]
        if len(kept) < len(held):
            log(f"chatrlhf {command}: {len(held) - len(kept)} --eval-data {what} share a prompt with training: not used")
        return records, kept, counts, f"{HELD_OUT}: --eval-data {','.join(cfg.eval_data)}"
    train, held = split_by_prompt(records, cfg.eval_fraction, cfg.seed)
    return train, held, counts, f"{HELD_OUT}: {cfg.eval_fraction:g} of the prompts (seed {cfg.seed})"


# --------------------------------------------------------------------------- unpaired feedback (KTO)
# KTO learns from single replies marked desirable or undesirable. Every feedback kind gives them:
#   * ratings: 4–5 stars desirable, 1–2 undesirable, 3 (neutral) dropped; thumbs up / down;
#   * preferences: the chosen reply desirable, the rejected one undesirable (TRL's unpair_preference_dataset);
#     a both-bad pair gives two undesirable replies; a tie says nothing about either reply alone: dropped;
#   * corrections: the corrected reply desirable, the original undesirable.
# Each reply keeps its record's weight (annotator reliability); the same reply marked twice is kept twice.
DESIRABLE_STARS, UNDESIRABLE_STARS = 4, 2


def unpaired_feedback(records: list) -> tuple[list[Rating], Counter]:
    """Replies as thumbs ratings (score +1 desirable, −1 undesirable) with their weights, and what was used or
    dropped."""
    out: list[Rating] = []
    counts: Counter = Counter()

    def add(prompt, reply, good: bool, r, kind: str):
        counts[f"{kind}_{'desirable' if good else 'undesirable'}"] += 1
        out.append(Rating(prompt, reply, 1.0 if good else -1.0, "thumbs", getattr(r, "annotator", ""),
                          float(getattr(r, "weight", 1.0)), getattr(r, "round", 0), r.where))

    for r in records:
        if isinstance(r, Rating):
            good = r.score > 0 if r.scale == "thumbs" else r.score >= DESIRABLE_STARS
            if r.scale == "stars" and UNDESIRABLE_STARS < r.score < DESIRABLE_STARS:
                counts["dropped_neutral_rating"] += 1
                continue
            add(r.prompt, r.response, good, r, "rating")
        elif isinstance(r, Correction):
            add(r.prompt, r.corrected, True, r, "correction")
            add(r.prompt, r.response, False, r, "correction")
        elif isinstance(r, Preference):
            if r.tie and not r.both_bad:
                counts["dropped_ties"] += 1
                continue
            add(r.prompt, r.chosen, not r.both_bad, r, "preference")
            add(r.prompt, r.rejected, False, r, "preference")
    return out, counts
