"""OpenAssistant message trees: the nested tree export (``oasst_tree``: one tree per row, replies inside
their parent) and the official flat message export (``oasst_flat``: one message per row, ``message_id`` /
``parent_id``, as oasst1/oasst2 on the Hugging Face Hub), rebuilt into the same trees and read as three views.

* **preference** — for every user turn, each two ranked sibling assistant replies of different rank make a pair,
  the lower rank (0 = best) chosen, the history up to and including that user turn as the prompt. Pairs with the
  same text are reported and skipped. (The rule of ``shared/data/sft/oasst_en100_rank_pairs``.)
* **conversation** — ``top1`` (the default): from each root prompt, the best-ranked usable reply at every step
  (unranked after ranked, ties in file order), a trailing user turn dropped, kept when ≥ 2 turns. SFT imitates
  the reply the annotators preferred, and each tree counts once, as in the OpenAssistant top-1 SFT sets.
  ``all`` (formats ``oasst_flat_all`` / ``oasst_tree_all``): every usable assistant reply once, with its own
  history (``last_only``, so a shared history is context and never a repeated target) — about 6× the replies,
  lower-ranked ones included.
* **prompt** — every usable user turn with the history before it (follow-up turns too: real multi-turn states).

Usable = not ``deleted``, not ``synthetic``, ``review_result`` not false; the replies under an unusable message
are not used either (they answer text we drop). Messages whose ``parent_id`` is not in the file (a filtered or
split export) are skipped with their replies and reported, one problem per such message, never fatal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Iterable, Iterator

from chatrlhf.data.records import Conversation, Message, Preference, Problem
from chatrlhf.errors import DataError

ROLE = {"prompter": "user", "user": "user", "assistant": "assistant"}


@dataclass
class Node:
    role: str  # user | assistant
    text: str
    rank: int | None  # 0 = best among siblings; None = unranked
    usable: bool
    where: str  # file:line of the message (flat) or of its tree (nested)
    tree: str = ""  # message_tree_id
    children: list[Node] = field(default_factory=list)


@dataclass
class Forest:
    roots: list[Node]
    problems: list[Problem]


# --------------------------------------------------------------------------- fields


def _flag(value) -> bool | None:
    """A boolean column as JSON, CSV or parquet give it (None when absent)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "y")
    return bool(value)


def _rank(value, path, loc, name: str) -> int | None:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        rank = float(value)
    except (TypeError, ValueError):
        rank = math.nan
    if not rank.is_integer() or rank < 0 or isinstance(value, bool):
        raise DataError(path, loc, name, f"expected a rank 0, 1, 2, … or null, got {value!r}", "0 = best sibling")
    return int(rank)


def _role(value, path, loc, name: str) -> str:
    role = ROLE.get(str(value).strip().lower())
    if role is None:
        raise DataError(path, loc, name, f"expected 'prompter' or 'assistant', got {value!r}", "")
    return role


def _node(msg: dict, path, loc, prefix: str, tree: str) -> Node:
    """A message's own fields; errors name ``prefix + field`` ("" for flat rows, "prompt.replies[0]." nested)."""
    role = _role(msg.get("role"), path, loc, prefix + "role")
    usable = not _flag(msg.get("deleted")) and not _flag(msg.get("synthetic")) and _flag(msg.get("review_result")) \
        is not False
    text = msg.get("text")
    if usable and (not isinstance(text, str) or not text.strip()):
        raise DataError(path, loc, prefix + "text", f"empty {role} message", "write its text, or mark it deleted")
    rank = _rank(msg.get("rank"), path, loc, prefix + "rank")
    return Node(role, text if isinstance(text, str) else "", rank, usable, f"{path}:{loc}", tree)


def _check_child(parent: Node, child: Node, path, loc, name: str) -> None:
    if child.role == parent.role:
        raise DataError(path, loc, name, f"a {child.role} message replies to a {parent.role} message "
                        f"({parent.where})", "prompter and assistant messages must alternate")


# --------------------------------------------------------------------------- readers


def nested_tree(row: dict, path, loc) -> Node:
    """One row of the nested export: {"message_tree_id", "prompt": {role, text, rank, …, "replies": […]}}."""
    tree = str(row.get("message_tree_id") or "")
    if not isinstance(row.get("prompt"), dict):
        raise DataError(path, loc, "prompt", "expected the root message as an object", "")
    root = _node(row["prompt"], path, loc, "prompt.", tree)
    if root.role != "user":
        raise DataError(path, loc, "prompt.role", "a tree must start with a prompter message", "")
    stack = [(row["prompt"], root, "prompt")]
    while stack:
        msg, node, name = stack.pop()
        replies = msg.get("replies") or []
        if not isinstance(replies, list):
            raise DataError(path, loc, f"{name}.replies", "expected a list of messages", "")
        for i, reply in enumerate(replies):
            child_name = f"{name}.replies[{i}]"
            if not isinstance(reply, dict):
                raise DataError(path, loc, child_name, "expected a message object", "")
            child = _node(reply, path, loc, child_name + ".", tree)
            _check_child(node, child, path, loc, f"{child_name}.role")
            node.children.append(child)
            stack.append((reply, child, child_name))
    return root


def flat_forest(rows: Iterable[tuple], path, collect: bool = False) -> Forest:
    """Trees from flat-export rows (any order). A bad row raises DataError, or with ``collect`` becomes a problem
    (its replies are then reported as missing a parent)."""
    nodes: dict[str, tuple[Node, str | None, object]] = {}  # id -> (node, parent id, loc)
    problems: list[Problem] = []
    for loc, row in rows:
        try:
            mid = row.get("message_id")
            if not isinstance(mid, str) or not mid.strip():
                raise DataError(path, loc, "message_id", "missing or empty", "every message needs its id")
            if mid in nodes:
                raise DataError(path, loc, "message_id", f"duplicate id (first at {nodes[mid][0].where})", "")
            parent = row.get("parent_id") or None
            nodes[mid] = (_node(row, path, loc, "", str(row.get("message_tree_id") or "")),
                          str(parent) if parent is not None else None, loc)
        except DataError as e:
            if not collect:
                raise
            problems.append(Problem(f"{path}:{loc}", str(e).split(": ", 1)[-1]))
    return _link(nodes, path, problems, collect)


def _link(nodes: dict, path, problems: list[Problem], collect: bool) -> Forest:
    roots, orphans, rejected = [], [], []
    for node, parent, loc in nodes.values():  # file order, so siblings keep it
        try:
            if parent is None and node.role != "user":
                raise DataError(path, loc, "role", "a tree must start with a prompter message (parent_id is null)", "")
            if parent is not None and parent in nodes:
                _check_child(nodes[parent][0], node, path, loc, "role")
        except DataError as e:
            if not collect:
                raise
            problems.append(Problem(node.where, str(e).split(": ", 1)[-1]))
            rejected.append(node)
            continue
        if parent is None:
            roots.append(node)
        elif parent not in nodes:
            orphans.append((node, parent))
        else:
            nodes[parent][0].children.append(node)
    for node, parent in orphans:
        n = sum(1 for _ in _descendants(node)) - 1
        under = "" if n == 0 else f" and the {n} repl{'y' if n == 1 else 'ies'} under it"
        problems.append(Problem(node.where, f"field 'parent_id': {parent} is not in the file: this message{under} "
                                "skipped"))
    reached = sum(1 for top in roots + [o for o, _ in orphans] + rejected for _ in _descendants(top))
    if reached < len(nodes):
        problems.append(Problem(str(path), f"{len(nodes) - reached} messages are not connected to a root prompt "
                                "(their parent_ids form a cycle): skipped"))
    return Forest(roots, problems)


def _descendants(node: Node) -> Iterator[Node]:
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(n.children)


# --------------------------------------------------------------------------- views


def walk(roots: list[Node]) -> Iterator[tuple[Node, list[Message]]]:
    """Every usable message reachable through usable messages, with the conversation up to and including it."""
    stack = [(r, [{"role": r.role, "content": r.text}]) for r in reversed(roots) if r.usable]
    while stack:
        node, history = stack.pop()
        yield node, history
        for child in reversed(node.children):
            if child.usable:
                stack.append((child, history + [{"role": child.role, "content": child.text}]))


def _best(children: list[Node]) -> Node | None:
    usable = [c for c in children if c.usable]
    return min(usable, key=lambda c: (c.rank is None, c.rank or 0)) if usable else None  # min keeps file order


def top1_paths(roots: list[Node]) -> list[tuple[Node, list[Message]]]:
    """(root, its top-1 path) for each usable root whose path has ≥ 2 turns after a trailing user turn is dropped."""
    out = []
    for root in roots:
        if not root.usable:
            continue
        messages, node = [], root
        while node is not None:
            messages.append({"role": node.role, "content": node.text})
            node = _best(node.children)
        if messages[-1]["role"] == "user":
            messages.pop()
        if len(messages) >= 2:
            out.append((root, messages))
    return out


def rank_pairs(roots: list[Node]) -> tuple[list[Preference], list[Problem]]:
    pairs, problems = [], []
    for node, history in walk(roots):
        ranked = [c for c in node.children if c.usable and c.role == "assistant" and c.rank is not None]
        for a, b in combinations(sorted(ranked, key=lambda c: c.rank), 2):  # stable: file order within a rank
            if a.rank == b.rank:
                continue
            where = a.where if a.where == b.where else f"{a.where} + {b.where.rpartition(':')[2]}"  # file:3 + 5
            if a.text.strip() == b.text.strip():
                problems.append(Problem(where, "chosen and rejected are identical: skipped"))
                continue
            pairs.append(Preference(history, a.text, b.text, source="oasst", where=where))
    return pairs, problems


def views(forest: Forest, paths: str = "top1") -> tuple[dict[str, list], list[Problem]]:
    """({"conversation", "preference", "prompt": records}, problems) of a forest; ``paths`` = top1 | all (see the
    module docstring)."""
    if paths == "top1":
        conversations = [Conversation(m, root.where) for root, m in top1_paths(forest.roots)]
    else:
        conversations = [Conversation(h, n.where, last_only=True) for n, h in walk(forest.roots)
                         if n.role == "assistant"]
    pairs, problems = rank_pairs(forest.roots)
    prompts = [Conversation(h, n.where) for n, h in walk(forest.roots) if n.role == "user"]
    return {"conversation": conversations, "preference": pairs, "prompt": prompts}, forest.problems + problems


def read_forest(path: str | Path, rows: Iterable[tuple], nested: bool, collect: bool = False) -> Forest:
    """The trees of a nested (one tree per row) or flat (one message per row) export."""
    if not nested:
        return flat_forest(rows, path, collect)
    roots, problems = [], []
    for loc, row in rows:
        try:
            roots.append(nested_tree(row, path, loc))
        except DataError as e:
            if not collect:
                raise
            problems.append(Problem(f"{path}:{loc}", str(e).split(": ", 1)[-1]))
    return Forest(roots, problems)
