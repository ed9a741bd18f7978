"""Import records of any chatrlhf format into the feedback store as prompts, replies and items to label."""

from __future__ import annotations

import json

from chatrlhf.data.formats import load_records
from chatrlhf.data.records import Conversation, Correction, Preference, Rating
from chatrlhf.errors import UsageError
from chatrlhf.feedback.store import Store

KINDS = ("auto", "rate", "compare", "correct")
MAX_K, MAX_ROUND = 100, 1_000_000


def import_file(store: Store, data: str, kind: str = "auto", k: int = 1, round: int = 0, model: str = "imported",
                source: str | None = None) -> dict:
    """Records of any chatrlhf format in file ``data`` → prompts, replies (with provenance: ``model``) and items
    (``kind``, ``k`` annotators each, ``round``), in one transaction: a file that fails half-way leaves nothing
    behind. ``source`` is recorded with each prompt (default: the path). Used by `chatrlhf feedback import` and
    the admin page's import; errors name the flags."""
    if not data:
        raise UsageError("--data is required")
    if kind not in KINDS:
        raise UsageError(f"--kind {kind!r}: not one of {', '.join(KINDS)}")
    if not 1 <= k <= MAX_K:
        raise UsageError(f"--k {k}: must be 1–{MAX_K}")
    if not 0 <= round <= MAX_ROUND:
        raise UsageError(f"--round {round}: must be 0–{MAX_ROUND:,}")
    records = load_records(data).records  # every record parsed before anything is written
    source = source or data
    counts = {"prompts": 0, "replies": 0, "items": 0}
    prompt_ids: dict[str, int] = {}

    def prompt(messages):
        key = json.dumps(messages, sort_keys=True)
        if key not in prompt_ids:
            prompt_ids[key] = store.add_prompt(messages, source=source, round=round)
            counts["prompts"] += 1
        return prompt_ids[key]

    def reply(pid, text):
        counts["replies"] += 1
        return store.add_reply(pid, text, model=model, round=round)

    def item(item_kind, a, b=None):
        counts["items"] += 1
        return store.add_item(item_kind, a, b, k=k, round=round)

    with store.transaction():
        for rec in records:
            _import_one(rec, kind, prompt, reply, item)
    return counts


def _import_one(rec, kind: str, prompt, reply, item) -> None:
    if isinstance(rec, Preference) and kind in ("auto", "compare"):
        pid = prompt(rec.prompt)
        item("compare", reply(pid, rec.chosen), reply(pid, rec.rejected))
    elif isinstance(rec, (Preference, Rating, Correction)):
        pid = prompt(rec.prompt)
        for text in ([rec.chosen, rec.rejected] if isinstance(rec, Preference) else [rec.response]):
            item("correct" if kind == "correct" else "rate", reply(pid, text))
    elif isinstance(rec, Conversation):
        if rec.messages and rec.messages[-1]["role"] == "assistant":
            item("correct" if kind == "correct" else "rate", reply(prompt(rec.prompt), rec.messages[-1]["content"]))
        else:
            prompt(rec.messages)
