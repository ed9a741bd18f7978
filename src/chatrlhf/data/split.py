"""Prompt-disjoint train/eval splits: records are grouped by the conversation's opening (its first
user turn, normalised), so no opening lands in both train and eval."""

from __future__ import annotations

import hashlib
import random

from chatrlhf.data.records import prompt_key


def group_key(record) -> str:
    users = [m for m in record.prompt if m["role"] == "user"]
    return prompt_key(users[:1] or record.prompt)


def group_hash(record) -> str:
    """A short hash of a record's prompt group, kept with a trained model so that later commands can tell the
    prompts it was trained on (`reward eval` refuses them)."""
    return hashlib.sha1(group_key(record).encode(), usedforsecurity=False).hexdigest()[:16]


def split_by_prompt(records: list, eval_fraction: float, seed: int = 0) -> tuple[list, list]:
    if eval_fraction <= 0:
        return list(records), []
    groups: dict[str, list] = {}
    for r in records:
        groups.setdefault(group_key(r), []).append(r)
    keys = sorted(groups)
    # a reproducible data split, not a secret:
    random.Random(seed).shuffle(keys)  # nosec B311
    n_eval = max(1, round(eval_fraction * len(keys))) if len(keys) > 1 else 0
    eval_keys = set(keys[:n_eval])
    train = [r for r in records if group_key(r) not in eval_keys]
    held = [r for r in records if group_key(r) in eval_keys]
    return train, held
