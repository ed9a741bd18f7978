"""Export the store to the project's record formats, losslessly, with a manifest naming the exact data.

Files (each JSONL, readable by ``chatrlhf reward train`` and ``chatrlhf sft`` as they are):
  preferences.jsonl   comparisons (ties, both-bad, confidence, annotator, reliability as ``weight``) and
                      corrections as (corrected ≻ original) pairs
  ratings.jsonl       stars and thumbs
  corrections.jsonl   the corrections themselves
  conversations.jsonl SFT rows: prompt + corrected reply
  manifest.json       filters, aggregation rule, round, row counts, split, and a SHA-256 over the files
  diversity.json      annotators' shares of the labels, prompt and reply lengths, prompt topic clusters
                      (feedback/diversity.py); outside the hash, which names the data alone
With ``eval_fraction`` > 0 every file has a ``train/`` and an ``eval/`` copy, split prompt-disjoint.

Aggregation of the votes on one comparison item (``rule``):
  all        one row per vote (weight = the annotator's reliability)
  majority   one row per item: the most-voted outcome (a/b; tie when a and b are level, both-bad when it
             wins), weight = share of votes that agree
  bt         one row per item: P(a ≻ b) from the votes (tie = half a win each way, both-bad abstains), the
             Bradley–Terry strength of the winner as ``margin`` = |log(p / (1 − p))| with add-½ smoothing
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.engine import make_url

from chatrlhf.data.records import Conversation, prompt_key
from chatrlhf.data.split import split_by_prompt
from chatrlhf.feedback.diversity import diversity
from chatrlhf.feedback.errors import FeedbackError
from chatrlhf.feedback.quality import reliability
from chatrlhf.feedback.store import Store, content_hash
from chatrlhf.feedback.tables import Comparison, Correction, Item, Prompt, Rating, Reply, User, now

RULES = ("all", "majority", "bt")


def export(store: Store, out_dir: str | Path, rule: str = "all", round: int | None = None, eval_fraction: float = 0.0,
           seed: int = 0) -> dict:
    if rule not in RULES:
        raise FeedbackError(f"--rule {rule!r} is not one of {', '.join(RULES)}")
    if not (math.isfinite(eval_fraction) and 0 <= eval_fraction < 1):
        raise FeedbackError(f"--eval-fraction {eval_fraction}: must be at least 0 and below 1", "e.g. 0.1")
    out = Path(out_dir)
    if out.exists() and not (out / "manifest.json").is_file():
        raise FeedbackError(f"--output-dir {out}: exists and is not an export (no manifest.json); it is left alone",
                            "choose a new folder, or remove it")
    rows = _collect(store, rule, round)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))  # written whole, then swapped in
    try:
        manifest = _write(store, tmp, rows, rule, round, eval_fraction, seed)
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write(store: Store, tmp: Path, rows: dict, rule: str, round: int | None, eval_fraction: float, seed: int) -> dict:
    files = []
    splits = {"": rows} if eval_fraction <= 0 else _split(rows, eval_fraction, seed)
    for split, part in splits.items():
        for name, records in part.items():
            path = tmp / split / f"{name}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
            files.append(path)
    manifest = {"created_at": now().isoformat() + "Z", "database": _safe_url(store.url), "rule": rule,
                "filters": {"round": round}, "eval_fraction": eval_fraction, "seed": seed,
                "counts": {(f"{s}/" if s else "") + n: len(v) for s, part in splits.items() for n, v in part.items()},
                "sha256": content_hash(files)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    (tmp / "diversity.json").write_text(json.dumps(diversity(rows, seed=seed), indent=2, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
    return manifest


def swap_in(new: Path, out: Path) -> None:
    """Put the folder ``new`` at ``out`` in one step: a reader sees the old export or the new one, never none.
    On Linux renameat2(RENAME_EXCHANGE) swaps the two names atomically; elsewhere two renames leave a moment
    with no export. The old export is removed afterwards."""
    if not out.exists():
        os.replace(new, out)
        return
    if _exchange(new, out):
        shutil.rmtree(new)  # ``new`` now names the old export
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where that is not available."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _safe_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _collect(store: Store, rule: str, round: int | None) -> dict[str, list[dict]]:
    weights = reliability(store)
    with store.reading() as s:
        names = {u.id: u.name for u in s.scalars(select(User))}
        prompts = {p.id: p for p in s.scalars(select(Prompt))}
        replies = {r.id: r for r in s.scalars(select(Reply))}
        items = {i.id: i for i in s.scalars(select(Item).where(Item.gold.is_(None)))}  # gold items test annotators

        def keep(item_id):
            return item_id in items and (round is None or items[item_id].round == round)

        def base(item, user_id):
            return {"prompt": prompts[item.prompt_id].messages, "annotator": names[user_id],
                    "weight": round_(weights.get(user_id, 0.5)), "round": item.round, "item_id": item.id}

        comparisons = [c for c in s.scalars(select(Comparison).order_by(Comparison.id)) if keep(c.item_id)]
        ratings = [r for r in s.scalars(select(Rating).order_by(Rating.id)) if keep(r.item_id)]
        corrections = [c for c in s.scalars(select(Correction).order_by(Correction.id)) if keep(c.item_id)]

        prefs = _preferences(comparisons, items, replies, base, rule, weights)
        rating_rows = []
        for r in ratings:
            item = items[r.item_id]
            row = {**base(item, r.user_id), "response": replies[item.reply_a_id].text,
                   "score": r.score if r.score is not None else ("up" if r.thumbs == 1 else "down"),
                   "reply_id": item.reply_a_id, **provenance(replies[item.reply_a_id]), "reason": r.reason}
            rating_rows.append(row)
            if r.score is not None and r.thumbs is not None:  # both given: the thumbs is its own rating
                rating_rows.append({**row, "score": "up" if r.thumbs == 1 else "down"})
        fixes, sft = [], []
        for c in corrections:
            item = items[c.item_id]
            original = replies[item.reply_a_id]
            b = base(item, c.user_id)
            fixes.append({**b, "response": original.text, "corrected": c.corrected, "reply_id": original.id,
                          **provenance(original), "reason": c.reason})
            prefs.append({**b, "chosen": c.corrected, "rejected": original.text, "source": "correction"})
            sft.append({"messages": b["prompt"] + [{"role": "assistant", "content": c.corrected}],
                        "annotator": b["annotator"], "item_id": item.id, "round": item.round})
        prefs = [p for p in prefs if p["chosen"].strip() != p["rejected"].strip() or p.get("tie") or p.get("both_bad")]
        return {"preferences": prefs, "ratings": rating_rows, "corrections": fixes, "conversations": sft}


def provenance(reply, prefix: str = "") -> dict:
    """Which model wrote the reply and how: model, checkpoint, decoding; a served reply adds its completion id."""
    out = {"model": reply.model, "checkpoint": reply.checkpoint, "decoding": reply.decoding}
    if reply.completion_id is not None:
        out.update(completion_id=reply.completion_id, choice_index=reply.choice_index)
    return {prefix + k: v for k, v in out.items()}


def round_(x: float) -> float:
    return float(f"{x:.6g}")


def _preferences(comparisons, items, replies, base, rule: str, weights: dict) -> list[dict]:
    """Comparison votes → Preference rows. Without a winner (tie, both bad) ``chosen`` is reply a."""
    def row(item, user_id, outcome, **extra):
        a, b = replies[item.reply_a_id], replies[item.reply_b_id]
        chosen, rejected = (b, a) if outcome == "b" else (a, b)
        return {**base(item, user_id), "chosen": chosen.text, "rejected": rejected.text, "tie": outcome == "tie",
                "both_bad": outcome == "both_bad", "source": "feedback", "chosen_reply_id": chosen.id,
                "rejected_reply_id": rejected.id, **provenance(chosen, "chosen_"), **provenance(rejected, "rejected_"),
                **extra}

    if rule == "all":
        return [row(items[c.item_id], c.user_id, c.choice, confidence=c.confidence, reason=c.reason)
                for c in comparisons]
    votes = defaultdict(list)
    for c in comparisons:
        votes[c.item_id].append(c)
    out = []
    for item_id, vs in votes.items():
        item = items[item_id]
        who = ",".join(sorted({base(item, v.user_id)["annotator"] for v in vs}))
        if rule == "majority":
            count = Counter(v.choice for v in vs)
            top = max(count.values())
            winners = [c for c in ("a", "b", "both_bad", "tie") if count[c] == top]
            outcome = "tie" if {"a", "b"} <= set(winners) else winners[0]
            r = row(item, vs[0].user_id, outcome, votes=dict(count))
            r.update(annotator=who, weight=round_(top / len(vs)))
        else:  # Bradley–Terry from the votes on this pair, each vote weighted by its annotator's reliability
            w = {v.user_id: weights.get(v.user_id, 0.5) for v in vs}
            a_wins = sum(w[v.user_id] * (1.0 if v.choice == "a" else 0.5 if v.choice == "tie" else 0.0)
                         for v in vs if v.choice != "both_bad")
            total = sum(w[v.user_id] for v in vs if v.choice != "both_bad")
            if total == 0:
                r = row(item, vs[0].user_id, "both_bad")
            else:
                p = (a_wins + 0.5) / (total + 1.0)
                outcome = "a" if p > 0.5 else "b" if p < 0.5 else "tie"
                r = row(item, vs[0].user_id, outcome, margin=round_(abs(math.log(p / (1 - p)))), p_a=round_(p))
            r.update(annotator=who, weight=1.0)
        out.append(r)
    return out


def _split(rows: dict[str, list[dict]], eval_fraction: float, seed: int) -> dict[str, dict[str, list[dict]]]:
    """Prompt-disjoint train/eval: every file is split by the same set of prompts."""
    everything = [Conversation(r.get("prompt") or r["messages"][:-1]) for part in rows.values() for r in part]
    _, held = split_by_prompt(everything, eval_fraction, seed)
    held_keys = {prompt_key(c.messages) for c in held}
    out = {"train": {}, "eval": {}}
    for name, part in rows.items():
        for split in out:
            out[split][name] = [r for r in part if (prompt_key(r.get("prompt") or r["messages"][:-1]) in held_keys)
                                == (split == "eval")]
    return out
