"""Counterfactual prompt sets for the bias probe: prompts that differ only in one group term.

The term lists (terms.yaml), the prompt templates (templates.yaml) and the refusal phrases (refusals.yaml) are data
files next to this module; ``--bias-terms FILE`` adds dimensions or replaces one of the same name. Everything here is
pure text processing (no model), each piece with a hand-computed test in tests/test_bias.py.

A *set* holds one prompt per group of a dimension, aligned: the same template filled with term i of each group, or
one held-out prompt in which the terms of the one group it mentions are swapped for each other group's term i
(case kept: ``Mother`` → ``Father``; whole words only: ``son`` is not found in ``Sonia`` or ``grandson``).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from chatrlhf.errors import UsageError

HERE = Path(__file__).resolve().parent
TERMS, TEMPLATES, REFUSALS = HERE / "terms.yaml", HERE / "templates.yaml", HERE / "refusals.yaml"
SCHEMA_HINT = ("write `dimensions: {NAME: {slot: SLOT, groups: {GROUP: [term, ...], ...}}}` with at least two "
               "groups of equally many terms (docs/bias.md)")


@dataclass(frozen=True)
class Dimension:
    name: str
    slot: str  # the {placeholder} of the templates its terms fill
    groups: dict[str, list[str]]  # group → terms, aligned by position across groups


@dataclass
class CounterfactualSet:
    dimension: str
    source: str  # "template" or "held-out"
    prompts: dict[str, list[dict]]  # group → the prompt (messages), identical but for the group's term
    replies: dict[str, str]  # group → the fixed reply the reward model scores (its terms swapped alike)


# --------------------------------------------------------------------------- the data files


def _read_yaml(path: Path, flag: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot read it ({e.strerror})",
                         "give an existing YAML or JSON file") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{flag} {path}: not valid YAML/JSON ({str(e).splitlines()[0]})", SCHEMA_HINT) from None
    return data if isinstance(data, dict) else {}


def parse_terms(data: dict, where: str) -> dict[str, Dimension]:
    """Check a terms file's contents (``where`` names it in errors) and return its dimensions."""
    dims = data.get("dimensions")
    if not isinstance(dims, dict) or not dims:
        raise UsageError(f"{where}: key 'dimensions': missing or not a mapping of dimension names", SCHEMA_HINT)
    out = {}
    for name, d in dims.items():
        key = f"dimensions.{name}"
        if not isinstance(d, dict) or not isinstance(d.get("slot"), str) or not d["slot"].isidentifier():
            raise UsageError(f"{where}: key '{key}.slot': missing or not a name like `person`", SCHEMA_HINT)
        groups = d.get("groups")
        if not isinstance(groups, dict) or len(groups) < 2:
            raise UsageError(f"{where}: key '{key}.groups': needs at least two groups", SCHEMA_HINT)
        seen: dict[str, str] = {}
        for g, terms in groups.items():
            if not isinstance(terms, list) or not terms or not all(isinstance(t, str) and t.strip() for t in terms):
                raise UsageError(f"{where}: key '{key}.groups.{g}': expected a non-empty list of terms", SCHEMA_HINT)
            if len(terms) != len(next(iter(groups.values()))):
                raise UsageError(f"{where}: key '{key}.groups.{g}': {len(terms)} terms, but the first group has "
                                 f"{len(next(iter(groups.values())))}", "terms are swapped by position: give every "
                                 "group of a dimension equally many")
            for t in terms:
                if seen.setdefault(t.lower(), str(g)) != str(g):
                    raise UsageError(f"{where}: key '{key}.groups.{g}': the term '{t}' is also in group "
                                     f"'{seen[t.lower()]}'", "a term belongs to one group of its dimension only")
        out[str(name)] = Dimension(str(name), d["slot"], {str(g): [t.strip() for t in ts] for g, ts in groups.items()})
    return out


def load_terms(extra: str = "", only: list[str] | None = None) -> dict[str, Dimension]:
    """The shipped dimensions, then ``extra``'s (a dimension of the same name replaces the shipped one whole);
    ``only`` keeps the named ones."""
    dims = parse_terms(_read_yaml(TERMS, "terms file"), str(TERMS))
    if extra:
        dims.update(parse_terms(_read_yaml(Path(extra), "--bias-terms"), f"--bias-terms {extra}"))
    unknown = [n for n in only or [] if n not in dims]
    if unknown:
        raise UsageError(f"--bias-dimensions: no dimension {', '.join(unknown)}", f"choose from {', '.join(dims)}")
    return {n: d for n, d in dims.items() if not only or n in only}


def load_templates() -> tuple[list[dict], str]:
    """[{prompt, reply?}], the default fixed reply."""
    data = _read_yaml(TEMPLATES, "templates file")
    return data["templates"], data["default_reply"]


def load_refusals() -> list[str]:
    return [p.lower() for p in _read_yaml(REFUSALS, "refusals file")["phrases"]]


# --------------------------------------------------------------------------- swapping


def match_case(original: str, term: str) -> str:
    """``term`` written the way ``original`` is: UPPER, Capitalised or lower (a lower-case list term stays as is)."""
    if len(original) > 1 and original.isupper():
        return term.upper()
    if original[:1].isupper():
        return term[:1].upper() + term[1:]
    return term.lower() if original.islower() else term


def term_pattern(dim: Dimension) -> re.Pattern:
    """Any term of the dimension as a whole word (hyphens count as part of a word), longest first, any case."""
    terms = sorted({t for ts in dim.groups.values() for t in ts}, key=len, reverse=True)
    return re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, terms)) + r")(?![\w-])", re.IGNORECASE)


def _lookup(dim: Dimension) -> dict[str, tuple[str, int]]:
    return {t.lower(): (g, i) for g, ts in dim.groups.items() for i, t in enumerate(ts)}


def groups_in(text: str, dim: Dimension) -> set[str]:
    where = _lookup(dim)
    return {where[m.group(1).lower()][0] for m in term_pattern(dim).finditer(text)}


def swap(text: str, dim: Dimension, target: str) -> str:
    """Every term of the dimension in ``text`` replaced by the ``target`` group's term at the same position."""
    where = _lookup(dim)
    return term_pattern(dim).sub(
        lambda m: match_case(m.group(1), dim.groups[target][where[m.group(1).lower()][1]]), text)


# --------------------------------------------------------------------------- the sets


def template_sets(dim: Dimension, templates: list[dict], default_reply: str) -> list[CounterfactualSet]:
    """Every template with the dimension's {slot}, filled with term i of each group, for every i."""
    out = []
    slot = "{" + dim.slot + "}"
    for t in templates:
        if slot not in t["prompt"]:
            continue
        for i in range(len(next(iter(dim.groups.values())))):
            fill = {g: terms[i] for g, terms in dim.groups.items()}
            out.append(CounterfactualSet(dim.name, "template",
                                         {g: [{"role": "user", "content": t["prompt"].replace(slot, w)}]
                                          for g, w in fill.items()},
                                         {g: t.get("reply", default_reply).replace(slot, w) for g, w in fill.items()}))
    return out


def held_out_sets(dim: Dimension, pairs: list[tuple[list[dict], list[str]]], default_reply: str
                  ) -> list[CounterfactualSet]:
    """The held-out prompts (with their first human reply, else ``default_reply``) that mention exactly one group of
    the dimension, swapped to every group. A prompt naming two groups (``mother and father``) has no clean
    counterfactual and is left out."""
    out = []
    for prompt, refs in pairs:
        reply = refs[0] if refs else default_reply
        found = groups_in("\n".join(m["content"] for m in prompt), dim)
        if len(found) != 1:
            continue
        out.append(CounterfactualSet(dim.name, "held-out",
                                     {g: [{**m, "content": swap(m["content"], dim, g)} for m in prompt]
                                      for g in dim.groups},
                                     {g: swap(reply, dim, g) for g in dim.groups}))
    return out


def build_sets(dims: dict[str, Dimension], pairs, max_sets: int, seed: int) -> dict[str, list[CounterfactualSet]]:
    """{dimension: at most ``max_sets`` sets}, drawn with ``seed`` from its template and held-out sets together."""
    templates, default_reply = load_templates()
    out = {}
    for name, dim in dims.items():
        sets = template_sets(dim, templates, default_reply) + held_out_sets(dim, pairs, default_reply)
        random.Random(seed).shuffle(sets)  # nosec B311 (a seeded draw of probe sets)
        out[name] = sets[:max_sets]
    return out
