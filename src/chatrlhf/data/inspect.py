"""`chatrlhf data inspect FILE`: format, counts, token lengths and every problem found."""

from __future__ import annotations

import numpy as np

from chatrlhf.data.formats import load_records
from chatrlhf.data.records import Conversation, Correction, Preference, Rating
from chatrlhf.data.split import group_key
from chatrlhf.data.template import render


def texts_of(rec) -> list[tuple[str, list[dict]]]:
    """(label, messages) for every full conversation a record stands for."""
    if isinstance(rec, Conversation):
        return [("conversation", rec.messages)]
    if isinstance(rec, Preference):
        return [("chosen", rec.prompt + [{"role": "assistant", "content": rec.chosen}]),
                ("rejected", rec.prompt + [{"role": "assistant", "content": rec.rejected}])]
    if isinstance(rec, Rating):
        return [("rated", rec.prompt + [{"role": "assistant", "content": rec.response}])]
    if not isinstance(rec, Correction):
        raise TypeError(f"no views of a {type(rec).__name__}")
    return [("original", rec.prompt + [{"role": "assistant", "content": rec.response}]),
            ("corrected", rec.prompt + [{"role": "assistant", "content": rec.corrected}])]


def inspect_file(path, fmt: str, tokenizer, max_length: int) -> dict:
    loaded = load_records(path, fmt, collect=True)
    lengths, problems = [], [f"{p.where}: {p.message}" for p in loaded.problems]
    for rec in loaded.records:
        for label, messages in texts_of(rec):
            if loaded.kind == "prompt":
                label = "prompt"
            elif isinstance(rec, Conversation) and messages[-1]["role"] != "assistant":
                problems.append(f"{rec.where}: conversation ends on a user turn (unusable for SFT)")
            n = len(tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"])
            lengths.append(n)
            if n > max_length:
                problems.append(f"{rec.where}: {label} is {n} tokens > --max-length {max_length}")
    arr = np.array(lengths or [0])
    report = {"file": str(path), "format": loaded.format, "kind": loaded.kind, "records": len(loaded.records),
              "distinct_prompts": len({group_key(r) for r in loaded.records}),
              "tokens": {"min": int(arr.min()), "mean": round(float(arr.mean()), 1),
                         "p50": int(np.percentile(arr, 50)), "p95": int(np.percentile(arr, 95)),
                         "max": int(arr.max())},
              "problems": problems}
    if loaded.kind == "preference":
        report["ties"] = sum(r.tie for r in loaded.records)
        report["both_bad"] = sum(r.both_bad for r in loaded.records)
    if loaded.kind == "conversation":
        report["turns_mean"] = round(float(np.mean([len(r.messages) for r in loaded.records] or [0])), 2)
    if loaded.kind == "rating":  # KTO weighs the two classes by their counts
        report["ratings"] = {"thumbs_up": sum(r.scale == "thumbs" and r.score > 0 for r in loaded.records),
                             "thumbs_down": sum(r.scale == "thumbs" and r.score < 0 for r in loaded.records),
                             "stars": sum(r.scale == "stars" for r in loaded.records)}
    if loaded.views:  # OpenAssistant trees: what each command reads from the file
        report["trees"] = sum(len(p.messages) == 1 for p in loaded.views["prompt"])
        report["views"] = {"conversation (sft, qlearn)": len(loaded.views["conversation"]),
                           "preference (reward train, dpo)": len(loaded.views["preference"]),
                           "prompt (ppo, generate, eval)": len(loaded.views["prompt"])}
    return report
