"""Pydantic bodies of the JSON API: strict (no coercion, no unknown fields)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class AnswerBody(Strict):
    """An answer through the JSON API; the store checks it against the item's kind."""
    score: float | None = Field(None, ge=1, le=5)
    thumbs: Literal[-1, 1] | None = None
    choice: Literal["a", "b", "tie", "both_bad"] | None = None
    confidence: float | None = Field(None, ge=0, le=1)
    corrected: str | None = Field(None, max_length=100_000)
    reason: str | None = Field(None, max_length=4000)


class LoginBody(Strict):
    name: str = Field(max_length=64)
    password: str = Field(max_length=1024)
