"""The feedback store's tables (SQLAlchemy 2 models). The schema is created and changed only by the Alembic
migrations (``feedback/migrations``), which read ``Base.metadata`` from here."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ROLES = ("admin", "annotator", "viewer")
KINDS = ("rate", "compare", "correct")
CHOICES = ("a", "b", "tie", "both_bad")


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(16))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)
    # part of every session cookie: logging out or switching the user off bumps it, which ends every session
    session_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Prompt(Base):
    __tablename__ = "prompts"
    __table_args__ = (Index("ix_prompts_source", "source"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    messages: Mapped[list] = mapped_column(JSON)          # [{"role", "content"}, …] up to the reply
    reference: Mapped[str | None] = mapped_column(Text)   # a human reply, if one came with the prompt
    source: Mapped[str] = mapped_column(String(256), default="")
    round: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class Reply(Base):
    __tablename__ = "replies"
    __table_args__ = (Index("ix_replies_completion", "completion_id", "choice_index", unique=True),)
    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    text: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(256), default="")       # model name or "imported"
    checkpoint: Mapped[str] = mapped_column(String(256), default="")  # checkpoint id / content hash
    decoding: Mapped[dict] = mapped_column(JSON, default=dict)        # temperature, top_k, …
    template: Mapped[str] = mapped_column(Text, default="")           # the prompt template used
    round: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)
    # a reply served by `chatrlhf serve --feedback-db`: its completion id and choice, as the client saw them
    completion_id: Mapped[str | None] = mapped_column(String(64))
    choice_index: Mapped[int | None] = mapped_column(Integer)
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)


class Item(Base):
    """One task: rate a reply, compare two, or correct one. ``gold`` holds the known answer of a gold item."""
    __tablename__ = "items"
    __table_args__ = (Index("ix_items_open", "filled", "id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    reply_a_id: Mapped[int] = mapped_column(ForeignKey("replies.id"))
    reply_b_id: Mapped[int | None] = mapped_column(ForeignKey("replies.id"))
    k: Mapped[int] = mapped_column(Integer, default=1)
    filled: Mapped[bool] = mapped_column(Boolean, default=False)  # has its k answers: never offered again
    # no lease of it ends before then (a lower bound, set when leases fill it): leasing skips it without counting
    held_until: Mapped[dt.datetime | None] = mapped_column(DateTime)
    gold: Mapped[dict | None] = mapped_column(JSON(none_as_null=True))  # SQL NULL, not JSON null
    round: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class Assignment(Base):
    """A lease: ``user`` may answer ``item`` until ``expires_at``; ``done`` once answered."""
    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("item_id", "user_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    leased_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)
    done: Mapped[bool] = mapped_column(Boolean, default=False)


class _Answer:
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class Rating(_Answer, Base):
    __tablename__ = "ratings"
    __table_args__ = (UniqueConstraint("item_id", "user_id"),)
    score: Mapped[float | None] = mapped_column(Float)     # 1–5 stars
    thumbs: Mapped[int | None] = mapped_column(Integer)    # +1 / −1


class Comparison(_Answer, Base):
    __tablename__ = "comparisons"
    __table_args__ = (UniqueConstraint("item_id", "user_id"),)
    choice: Mapped[str] = mapped_column(String(16))                   # a | b | tie | both_bad (item's a/b)
    a_shown_first: Mapped[bool] = mapped_column(Boolean, default=True)  # the random screen order
    confidence: Mapped[float | None] = mapped_column(Float)           # optional strength, 0–1


class Correction(_Answer, Base):
    __tablename__ = "corrections"
    __table_args__ = (UniqueConstraint("item_id", "user_id"),)
    corrected: Mapped[str] = mapped_column(Text)


class Event(Base):
    """Audit trail: who did what, when."""
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    action: Mapped[str] = mapped_column(String(64))
    detail: Mapped[dict] = mapped_column(JSON, default=dict)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


ANSWERS = {"rate": Rating, "compare": Comparison, "correct": Correction}
