"""The record types: the data contract between stages (see ARCHITECTURE.md).

Each record keeps ``where`` (``file:line``) so that any later stage can point the user back at the
exact row it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")
Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass
class Conversation:
    messages: list[Message]
    where: str = ""
    last_only: bool = False  # learn only the final reply (seed CSV rows: history is context, not target)

    @property
    def prompt(self) -> list[Message]:
        """Every turn before the last assistant reply."""
        return self.messages[:-1] if self.messages and self.messages[-1]["role"] == "assistant" else self.messages


@dataclass
class Preference:
    prompt: list[Message]
    chosen: str
    rejected: str
    margin: float = 0.0
    tie: bool = False
    both_bad: bool = False
    annotator: str = ""
    weight: float = 1.0
    round: int = 0
    source: str = ""
    where: str = ""


@dataclass
class Rating:
    prompt: list[Message]
    response: str
    score: float  # 1–5 on the "stars" scale; +1 / -1 on the "thumbs" scale
    scale: str = "stars"  # stars | thumbs — scores are compared only within one scale
    annotator: str = ""
    weight: float = 1.0
    round: int = 0
    where: str = ""


@dataclass
class Correction:
    prompt: list[Message]
    response: str
    corrected: str
    annotator: str = ""
    round: int = 0
    where: str = ""

    def as_preference(self) -> Preference:
        return Preference(self.prompt, chosen=self.corrected, rejected=self.response,
                          annotator=self.annotator, round=self.round, source="correction", where=self.where)

    def as_conversation(self) -> Conversation:
        return Conversation(self.prompt + [{"role": "assistant", "content": self.corrected}], self.where)


Record = Conversation | Preference | Rating | Correction


def prompt_key(messages: list[Message]) -> str:
    """The grouping key for prompt-disjoint splits: the conversation up to the reply, normalised."""
    return "\n".join(f"{m['role']}:{' '.join(m['content'].split()).lower()}" for m in messages
                     if m["role"] != "system")


@dataclass
class Problem:
    """A problem found in a record that was reported but not fatal (e.g. over-long, duplicate)."""
    where: str
    message: str


@dataclass
class Loaded:
    """What a reader returns: the records, the detected format and the non-fatal problems."""
    records: list
    format: str
    kind: str  # conversation | preference | rating | correction | prompt
    problems: list[Problem] = field(default_factory=list)
    views: dict[str, list] = field(default_factory=dict)  # other readings of the same file (OpenAssistant trees)

    def of(self, kind: str) -> list:
        """The records as ``kind`` (conversation | preference | prompt) where the format has that view (OASST
        trees hold conversations, rank pairs and prompts), else the records as they are."""
        return self.views.get(kind, self.records)
