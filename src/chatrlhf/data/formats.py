"""Record formats: detection from the columns of the first row, and parsing of each row into a
record with file:line:field errors.

The seed format is ``dialogue_history.csv``: ``history`` holds the earlier turns and ``responses``
the reply to learn. ``history`` may be
  * a JSON list of messages: ``[{"role": "user", "content": "Hi"}, {"role": "assistant", ...}]``, or
  * prefixed lines: ``User: Hi`` / ``Assistant: Hello!`` (``Human:`` and ``System:`` work too);
    a line without a prefix continues the turn above it. Text with no prefix at all is one user turn.

TRL's dataset types are read too: prompt-only (prompts), prompt-completion (a conversation whose completion is
the one target), unpaired preference (``label`` true/false: thumbs-up/down ratings, KTO's data) and preference
with conversational or implicit prompts. OpenAssistant exports, nested or flat (``message_id`` / ``parent_id``
rows), are whole trees: data/oasst.py rebuilds them and gives conversations, rank pairs and prompts
(``Loaded.of``). docs/formats.md has the rules.
"""

from __future__ import annotations

import json
import re
from itertools import chain
from pathlib import Path

from chatrlhf.data import oasst
from chatrlhf.data.records import ROLES, Conversation, Correction, Loaded, Preference, Problem, Rating
from chatrlhf.data.readers import read_rows
from chatrlhf.errors import DataError

KINDS = {"dialogue_csv": "conversation", "conversation": "conversation", "oasst_tree": "conversation",
         "oasst_tree_all": "conversation", "self_instruct": "conversation", "prompt_completion": "conversation",
         "hh": "preference", "oasst_pairs": "preference", "preference": "preference", "oasst_flat": "preference",
         "oasst_flat_all": "preference", "rating": "rating", "unpaired_preference": "rating",
         "correction": "correction", "prompt_only": "prompt", "prompts": "prompt"}
SIGNATURES = [  # (format, columns that must all be present), most specific first
    ("oasst_flat", {"message_id", "parent_id", "role", "text"}),
    ("oasst_tree", {"message_tree_id", "prompt"}),
    ("oasst_pairs", {"context", "chosen", "rejected"}),
    ("preference", {"prompt", "chosen", "rejected"}),
    ("hh", {"chosen", "rejected"}),
    ("correction", {"prompt", "response", "corrected"}),
    ("rating", {"prompt", "response", "score"}),
    ("unpaired_preference", {"prompt", "completion", "label"}),
    ("prompt_completion", {"prompt", "completion"}),
    ("dialogue_csv", {"history", "responses"}),
    ("conversation", {"messages"}),
    ("self_instruct", {"instruction", "instances"}),
    ("prompt_only", {"prompt"}),
]
# OpenAssistant exports are whole trees, read as every view (data/oasst.py): format -> (nested?, conversation paths)
TREES = {"oasst_tree": (True, "top1"), "oasst_tree_all": (True, "all"), "oasst_flat": (False, "top1"),
         "oasst_flat_all": (False, "all")}
REQUIRED = {**dict(SIGNATURES), "oasst_tree_all": {"message_tree_id", "prompt"},
            "oasst_flat_all": {"message_id", "parent_id", "role", "text"}}
PREFIX = re.compile(r"^\s*(user|human|assistant|system)\s*:\s?(.*)$", re.IGNORECASE)
PREFIX_ROLE = {"user": "user", "human": "user", "assistant": "assistant", "system": "system"}
LABELS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False, "up": True, "down": False}
THUMBS = {"up": 1.0, "down": -1.0, "👍": 1.0, "👎": -1.0, "thumbs_up": 1.0, "thumbs_down": -1.0}
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


class SkipRecord(DataError):
    """A record that published data sets contain in the wild and that cannot be used: reported and
    skipped, not fatal."""


# Columns that carry a reply: a row with one of them but no full signature is a broken record of a reply-bearing
# format (e.g. `chosen` without `rejected`), never a bare prompt.
REPLY_COLUMNS = {"chosen", "rejected", "response", "responses", "completion", "corrected", "score", "label"}


def signature(columns: set[str]) -> str | None:
    """The first format whose columns are all in ``columns``; None when none fits (or only prompt-only does while
    a reply column is there)."""
    fmt = next((f for f, needed in SIGNATURES if needed <= columns), None)
    return None if fmt == "prompt_only" and columns & REPLY_COLUMNS else fmt


def detect_format(path, columns: set[str], loc) -> str:
    fmt = signature(columns)
    if fmt is not None:
        return fmt
    expected = "; ".join(f"{f}: {', '.join(sorted(c))}" for f, c in SIGNATURES)
    raise DataError(path, loc, None, f"cannot tell the format from columns {sorted(columns)}",
                    f"expected one of — {expected} — or pass --format")


def load_records(path: str | Path, fmt: str = "auto", collect: bool = False) -> Loaded:
    """Read every record. With ``collect`` bad rows become problems (for `data inspect`);
    otherwise the first bad row raises DataError. OpenAssistant exports also carry their other views
    (``Loaded.of``)."""
    path = Path(path)
    rows = read_rows(path)
    first = next(rows, None)
    if first is None and fmt == "auto":
        raise DataError(path, None, None, "no records", "the file is empty")
    if fmt == "auto":
        fmt = detect_format(path, set(first[1]), first[0])
    rows = _checked(chain([first] if first else [], rows), path, fmt)
    if fmt in TREES:
        return _load_trees(path, rows, fmt, collect)
    records, problems = [], []
    for loc, row in rows:
        try:
            if isinstance(row, DataError):
                raise row
            for rec in PARSERS[fmt](row, path, loc):
                if isinstance(rec, Preference) and rec.chosen.strip() == rec.rejected.strip():
                    problems.append(Problem(f"{path}:{loc}", "chosen and rejected are identical: skipped"))
                else:
                    records.append(rec)
        except DataError as e:
            if not collect and not isinstance(e, SkipRecord):
                raise
            problems.append(Problem(f"{path}:{loc}", str(e).split(": ", 1)[-1]))
    return Loaded(records, fmt, KINDS[fmt], problems)


def _checked(rows, path, fmt):
    """The rows, a row that lacks a column of ``fmt`` replaced by its DataError."""
    for loc, row in rows:
        missing = sorted(REQUIRED[fmt] - set(row)) if fmt in REQUIRED else []
        yield loc, DataError(path, loc, missing[0], "missing column", f"format '{fmt}' needs columns "
                             f"{sorted(REQUIRED[fmt])}") if missing else row


def _load_trees(path: Path, rows, fmt: str, collect: bool) -> Loaded:
    nested, paths = TREES[fmt]
    bad: list[Problem] = []

    def good_rows():
        for loc, row in rows:
            if not isinstance(row, DataError):
                yield loc, row
            elif collect:
                bad.append(Problem(f"{path}:{loc}", str(row).split(": ", 1)[-1]))
            else:
                raise row

    forest = oasst.read_forest(path, good_rows(), nested, collect)
    found, problems = oasst.views(forest, paths)
    return Loaded(found[KINDS[fmt]], fmt, KINDS[fmt], bad + problems, views=found)


# --------------------------------------------------------------------------- messages


def check_messages(messages, path, loc, field: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(path, loc, field, "expected a non-empty list of {role, content} messages", "")
    out = []
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(path, loc, field, f"message {i} must be an object with 'role' and 'content'", "")
        role = str(m["role"]).strip().lower()
        role = {"human": "user", "prompter": "user", "gpt": "assistant", "bot": "assistant"}.get(role, role)
        if role not in ROLES:
            raise DataError(path, loc, field, f"unknown role '{m['role']}' in message {i}",
                            "use user, assistant or system")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise DataError(path, loc, field, f"message {i} ({role}) is empty", "write its text or drop it")
        out.append({"role": role, "content": m["content"]})
    return out


def parse_turns(text, path, loc, field: str) -> list[dict]:
    """A history / prompt cell: a JSON list of messages, prefixed lines, or plain user text."""
    if isinstance(text, list):
        return check_messages(text, path, loc, field)
    if text is None or not str(text).strip():
        return []
    text = str(text)
    if text.lstrip().startswith("["):
        try:
            return check_messages(json.loads(text), path, loc, field)
        except json.JSONDecodeError as e:
            raise DataError(path, loc, field, f"looks like JSON but is not valid ({e.msg} at column {e.colno})",
                            "write a JSON list of {role, content}, or 'User:'/'Assistant:' lines") from None
    lines = text.splitlines()
    if not any(PREFIX.match(line) for line in lines):
        return [{"role": "user", "content": text.strip()}]
    turns: list[dict] = []
    for n, line in enumerate(lines, 1):
        m = PREFIX.match(line)
        if m:
            turns.append({"role": PREFIX_ROLE[m.group(1).lower()], "content": m.group(2)})
        elif turns:
            turns[-1]["content"] += "\n" + line
        elif line.strip():
            raise DataError(path, loc, field, f"line {n} of the cell has no 'User:' or 'Assistant:' prefix",
                            "start every turn with 'User:' or 'Assistant:'")
    for t in turns:
        t["content"] = t["content"].strip()
    return check_messages(turns, path, loc, field)


def _text(row, key, path, loc) -> str:
    val = row.get(key)
    if val is None or not str(val).strip():
        raise DataError(path, loc, key, "empty reply" if key in ("responses", "response", "chosen", "rejected",
                                                                  "corrected", "completion") else "empty value",
                        "fill it in or remove the row")
    return str(val)


def _num(row, key, path, loc, default):
    val = row.get(key, default)
    if val in (None, ""):
        return default
    try:
        return float(val)
    except (TypeError, ValueError):
        raise DataError(path, loc, key, f"expected a number, got {val!r}", "") from None


def _bool(row, key) -> bool:
    val = row.get(key, False)
    return str(val).strip().lower() in ("1", "true", "yes", "y") if isinstance(val, str) else bool(val)


# --------------------------------------------------------------------------- parsers


def _dialogue_csv(row, path, loc):
    history = parse_turns(row.get("history"), path, loc, "history")
    reply = _text(row, "responses", path, loc).strip()
    if history and history[-1]["role"] == "assistant":
        raise DataError(path, loc, "history", "ends with an assistant turn, so 'responses' answers nobody",
                        "the last turn of history must be the user's")
    if not any(t["role"] == "user" for t in history):
        raise DataError(path, loc, "history", "has no user turn", "write the user's message")
    yield Conversation(history + [{"role": "assistant", "content": reply}], f"{path}:{loc}", last_only=True)


def _conversation(row, path, loc):
    messages = check_messages(row.get("messages"), path, loc, "messages")
    yield Conversation(messages, f"{path}:{loc}")


def _self_instruct(row, path, loc):
    instr = _text(row, "instruction", path, loc).strip()
    for inst in row.get("instances") or []:
        user = instr + ("\n\n" + inst["input"].strip() if inst.get("input", "").strip() else "")
        if str(inst.get("output", "")).strip():
            yield Conversation([{"role": "user", "content": user},
                                {"role": "assistant", "content": inst["output"].strip()}], f"{path}:{loc}")


def split_hh(transcript: str, path, loc, field) -> list[dict]:
    """'\\n\\nHuman: …\\n\\nAssistant: …' into messages."""
    parts = HH_TURN.split(transcript)
    if len(parts) < 3 or parts[0].strip():
        raise DataError(path, loc, field, "not an HH-RLHF transcript ('\\n\\nHuman: …\\n\\nAssistant: …')",
                        "or pass --format preference with prompt/chosen/rejected columns")
    turns = [{"role": "user" if r == "Human" else "assistant", "content": c.strip()}
             for r, c in zip(parts[1::2], parts[2::2])]
    return turns


def _hh(row, path, loc):
    """HH-RLHF as published: a few transcripts have empty Assistant turns (mid-dialogue, or an empty
    final reply that the annotator rated). They are kept as they are: an empty reply is a real choice.
    TRL's conversational form (lists of messages, the prompt implicit in both) is read too."""
    if isinstance(row.get("chosen"), list) or isinstance(row.get("rejected"), list):
        yield _implicit_prompt(row, path, loc)
        return
    chosen = split_hh(_text(row, "chosen", path, loc), path, loc, "chosen")
    rejected = split_hh(_text(row, "rejected", path, loc), path, loc, "rejected")
    for field, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":  # 4 such rows in hh-rlhf helpful-online
            raise SkipRecord(path, loc, field, "does not end with an Assistant turn: skipped", "")
    yield Preference(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], source="hh-rlhf",
                     where=f"{path}:{loc}")


def _implicit_prompt(row, path, loc) -> Preference:
    """TRL's preference with implicit prompt: chosen and rejected are whole conversations that differ only in
    their last (assistant) turn."""
    chosen, rejected = (check_messages(row.get(k), path, loc, k) for k in ("chosen", "rejected"))
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise DataError(path, loc, key, "does not end with an assistant turn", "the last message is the reply")
    if chosen[:-1] != rejected[:-1]:
        raise DataError(path, loc, "rejected", "differs from 'chosen' before the last turn: no shared prompt",
                        "both must be the same conversation up to the reply (or give a 'prompt' column)")
    return Preference(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], where=f"{path}:{loc}")


def _oasst_pairs(row, path, loc):
    prompt = check_messages(row["context"], path, loc, "context")
    yield Preference(prompt, _reply(row, "chosen", path, loc), _reply(row, "rejected", path, loc),
                     source="oasst", where=f"{path}:{loc}")


def _prompt(row, path, loc):
    prompt = parse_turns(row.get("prompt"), path, loc, "prompt")
    if not prompt:
        raise DataError(path, loc, "prompt", "empty value", "write the prompt")
    return prompt


def _user_prompt(row, path, loc, key: str = "prompt") -> list[dict]:
    return ends_on_user(parse_turns(row.get(key), path, loc, key), path, loc, key)


def ends_on_user(prompt: list[dict], path, loc, key: str) -> list[dict]:
    """A prompt that a reply answers: not empty, and ending on the user's turn."""
    if not prompt:
        raise DataError(path, loc, key, "empty prompt", "write the prompt")
    if prompt[-1]["role"] != "user":
        raise DataError(path, loc, key, f"ends on {'an' if prompt[-1]['role'] == 'assistant' else 'a'} "
                        f"{prompt[-1]['role']} turn, so a reply would answer nobody",
                        "end it with the user's turn (continuing a final assistant message is not supported)")
    return prompt


def _reply(row, key, path, loc) -> str:
    """A reply cell: text, or (TRL's conversational form) a list holding one assistant message — also as JSON text
    in a CSV cell."""
    val = _json_messages(row.get(key))
    if not isinstance(val, list):
        return _text(row, key, path, loc)
    turns = check_messages(val, path, loc, key)
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        raise DataError(path, loc, key, f"expected one assistant message, got {[t['role'] for t in turns]}",
                        "earlier turns belong in 'prompt'; one reply per record")
    return turns[0]["content"]


def _json_messages(val):
    """A JSON list of {role, content} written as text (a CSV cell) as that list; anything else as it is."""
    if isinstance(val, str) and val.lstrip().startswith("[{"):
        try:
            parsed = json.loads(val)
        except json.JSONDecodeError:
            return val
        if isinstance(parsed, list) and all(isinstance(m, dict) and "role" in m for m in parsed):
            return parsed
    return val


def _preference(row, path, loc):
    yield Preference(_prompt(row, path, loc), _reply(row, "chosen", path, loc), _reply(row, "rejected", path, loc),
                     margin=_num(row, "margin", path, loc, 0.0), tie=_bool(row, "tie"), both_bad=_bool(row, "both_bad"),
                     annotator=str(row.get("annotator") or ""), weight=_num(row, "weight", path, loc, 1.0),
                     round=int(_num(row, "round", path, loc, 0)), source=str(row.get("source") or ""),
                     where=f"{path}:{loc}")


def _rating(row, path, loc):
    raw = row.get("score")
    thumbs = THUMBS.get(str(raw).strip().lower()) if isinstance(raw, str) else None
    score = _num(row, "score", path, loc, None) if thumbs is None else thumbs
    if score is None or not (thumbs is not None or 1 <= score <= 5):
        raise DataError(path, loc, "score", f"out of range: {raw!r}", "use 1–5, or thumbs as up/down")
    yield Rating(_prompt(row, path, loc), _text(row, "response", path, loc), score,
                 scale="thumbs" if thumbs is not None else "stars",
                 annotator=str(row.get("annotator") or ""), weight=_num(row, "weight", path, loc, 1.0),
                 round=int(_num(row, "round", path, loc, 0)), where=f"{path}:{loc}")


def _correction(row, path, loc):
    yield Correction(_prompt(row, path, loc), _text(row, "response", path, loc), _text(row, "corrected", path, loc),
                     annotator=str(row.get("annotator") or ""), round=int(_num(row, "round", path, loc, 0)),
                     where=f"{path}:{loc}")


def _unpaired_preference(row, path, loc):
    """TRL's unpaired preference (KTO's data): label true = a desirable reply, false = an undesirable one, read as
    the thumbs up / down our feedback exports write."""
    raw = row.get("label")
    label = raw if isinstance(raw, bool) else LABELS.get(str(raw).strip().lower()) if isinstance(raw, (str, int)) \
        else None
    if label is None:
        raise DataError(path, loc, "label", f"expected true or false, got {raw!r}",
                        "true = a desirable reply (thumbs up), false = an undesirable one")
    yield Rating(_user_prompt(row, path, loc), _reply(row, "completion", path, loc), 1.0 if label else -1.0,
                 scale="thumbs", annotator=str(row.get("annotator") or ""), weight=_num(row, "weight", path, loc, 1.0),
                 round=int(_num(row, "round", path, loc, 0)), where=f"{path}:{loc}")


def _prompt_completion(row, path, loc):
    """TRL's prompt-completion: the completion is the reply to learn, the prompt its context (TRL's
    completion-only loss). A string prompt is one user turn; the completion a string or one assistant message."""
    reply = _reply(row, "completion", path, loc)
    yield Conversation(_user_prompt(row, path, loc) + [{"role": "assistant", "content": reply}], f"{path}:{loc}",
                       last_only=True)


def _prompt_only(row, path, loc):
    """Prompts for generation (TRL's prompt-only rows, a .txt line), or any row with a prompt / messages / history
    column (of conversations, the turns before the last reply)."""
    for key in ("messages", "prompt", "history"):
        if key in row:
            turns = parse_turns(row[key], path, loc, key)
            if turns and turns[-1]["role"] == "assistant" and key == "messages":
                turns = turns[:-1]
            yield Conversation(ends_on_user(turns, path, loc, key), f"{path}:{loc}")
            return
    raise DataError(path, loc, None, "no 'prompt', 'messages' or 'history' column", "")


PARSERS = {"dialogue_csv": _dialogue_csv, "conversation": _conversation, "self_instruct": _self_instruct,
           "hh": _hh, "oasst_pairs": _oasst_pairs, "preference": _preference, "rating": _rating,
           "correction": _correction, "unpaired_preference": _unpaired_preference,
           "prompt_completion": _prompt_completion, "prompt_only": _prompt_only, "prompts": _prompt_only}


def load_prompts(path: str | Path, fmt: str = "auto") -> list[list[dict]]:
    """Prompts (as message lists) from any data file: for conversations, everything before the reply."""
    if fmt == "auto" and prompts_only(path):
        fmt = "prompts"
    return [r.prompt for r in load_records(path, fmt).of("prompt")]


def prompts_only(path: str | Path) -> bool:
    """A file of bare prompts (a .txt, or rows without any record format's columns): no replies in it."""
    path = Path(path)
    return path.suffix == ".txt" or _looks_like_prompts(path)


def _looks_like_prompts(path: Path) -> bool:
    for _, row in read_rows(path):
        return signature(set(row)) in ("prompt_only", None) and not set(row) & REPLY_COLUMNS
    return False
