"""The data-diversity summary of a feedback export, written as ``diversity.json`` next to its manifest.

Bias enters through the data: a few annotators labelling most items, prompts on one topic, replies of one length.
The summary shows how the labels are spread, so a round can be judged before it trains anything:
  annotators  each annotator's number and share of the labels (a comparison vote, a rating, a correction each
              count once; an aggregated row — rule majority or bt — counts once for each annotator it names), the
              largest share and the effective number of annotators 1 / Σ share²
  lengths     words per distinct prompt and per distinct reply: count, mean, min, p10, median, p90, max
  topics      the distinct prompts in k clusters: TF-IDF over their words (English stop words dropped) and k-means
              (scikit-learn), each cluster's size, share, top terms and one example prompt
"""

from __future__ import annotations

import random
import warnings

import numpy as np

from chatrlhf.data.records import prompt_key

MAX_CLUSTERED = 5000  # prompts clustered at most (a seeded sample beyond that keeps an export fast)


def label_shares(rows: dict[str, list[dict]]) -> dict:
    counts: dict[str, int] = {}
    labels = [r for r in rows.get("preferences", []) if r.get("source") != "correction"]  # corrections: below
    for r in labels + rows.get("ratings", []) + rows.get("corrections", []):
        for name in str(r.get("annotator") or "unknown").split(","):
            counts[name] = counts.get(name, 0) + 1
    total = sum(counts.values())
    shares = {n: c / total for n, c in counts.items()} if total else {}
    return {"labels": total,
            "annotators": {n: {"labels": c, "share": round(shares[n], 4)}
                           for n, c in sorted(counts.items(), key=lambda x: -x[1])},
            "top_share": round(max(shares.values()), 4) if shares else 0.0,
            "effective_annotators": round(1 / sum(s * s for s in shares.values()), 3) if shares else 0.0}


def length_stats(lengths: list[int]) -> dict:
    if not lengths:
        return {"count": 0}
    x = np.asarray(lengths, dtype=float)
    p10, median, p90 = np.percentile(x, [10, 50, 90])
    return {"count": len(x), "mean": round(float(x.mean()), 2), "min": int(x.min()), "p10": float(p10),
            "median": float(median), "p90": float(p90), "max": int(x.max())}


def topic_clusters(texts: list[str], k: int = 5, seed: int = 0, top_terms: int = 5) -> dict:
    """The texts in at most ``k`` k-means clusters of their TF-IDF vectors, largest first."""
    from sklearn.cluster import KMeans  # scikit-learn loads in a second: only when an export is written
    from sklearn.feature_extraction.text import TfidfVectorizer

    if len(texts) > MAX_CLUSTERED:
        texts = random.Random(seed).sample(texts, MAX_CLUSTERED)  # nosec B311 (a seeded subsample)
    vectorizer = TfidfVectorizer(stop_words="english", max_features=5000)
    try:
        x = vectorizer.fit_transform(texts)
    except ValueError:  # no prompts, or nothing but stop words
        return {"k": 0, "clusters": [], "note": "no words to cluster"}
    k = min(k, len({tuple(row.indices) + tuple(row.data) for row in x}))
    if k < 2:
        return {"k": 0, "clusters": [], "note": "fewer than 2 distinct prompts"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k-means on tiny exports: convergence chatter, not a problem
        km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x)
    words = vectorizer.get_feature_names_out()
    clusters = []
    for c in range(k):
        members = np.flatnonzero(km.labels_ == c)
        order = np.argsort(-km.cluster_centers_[c])[:top_terms]
        clusters.append({"size": int(len(members)), "share": round(len(members) / len(texts), 4),
                         "top_terms": [str(words[i]) for i in order if km.cluster_centers_[c][i] > 0],
                         "example": texts[members[0]][:160]})
    clusters.sort(key=lambda c: -c["size"])
    return {"k": k, "prompts": len(texts), "clusters": clusters}


def diversity(rows: dict[str, list[dict]], k: int = 5, seed: int = 0) -> dict:
    """The summary of an export's rows ({file name: records}, as export writes them)."""
    prompts: dict[str, list[dict]] = {}
    replies: set[str] = set()
    for part in rows.values():
        for r in part:
            p = r.get("prompt") or r["messages"][:-1]
            prompts.setdefault(prompt_key(p), p)
            replies |= {r[f] for f in ("chosen", "rejected", "response", "corrected") if r.get(f)}
    texts = ["\n".join(m["content"] for m in p) for p in prompts.values()]
    return {"annotators": label_shares(rows),
            "lengths": {"prompt_words": length_stats([len(t.split()) for t in texts]),
                        "reply_words": length_stats([len(t.split()) for t in sorted(replies)])},
            "topics": topic_clusters(texts, k, seed)}


def summary_line(d: dict) -> str:
    """One line for the terminal."""
    a, t, ln = d["annotators"], d["topics"], d["lengths"]
    top = next(iter(a["annotators"]), "-")
    topics = "; ".join(f"{c['share']:.0%} {' '.join(c['top_terms'][:3])}" for c in t["clusters"]) or t.get("note", "")
    return (f"{a['labels']} labels from {len(a['annotators'])} annotators (largest share {a['top_share']:.0%}, {top}; "
            f"effective {a['effective_annotators']}), prompt words median {ln['prompt_words'].get('median', 0):g}, "
            f"reply words median {ln['reply_words'].get('median', 0):g}, topics: {topics}")
