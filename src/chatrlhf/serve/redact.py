"""``--redact``: e-mail addresses and phone numbers in stored text replaced by placeholders before anything is
written to the feedback store. Pure functions; the patterns err on the side of leaving numbers alone: a phone
number needs a leading ``+`` or separators in a phone's shape, so order numbers, prices, dates and plain digit
runs stay as they are (a reward model learns from them)."""

from __future__ import annotations

import re

EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# +44 20 7946 0958 · +1-555-123-4567 · (555) 123-4567 · 555-123-4567 · 555.123.4567 · 020 7946 0958
PHONE = re.compile(r"(?<![\w#$€£.-])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
                   r"|\(\d{2,4}\)[ .-]?\d{3,4}[ .-]?\d{3,4}"
                   r"|\d{3}[.-]\d{3}[.-]\d{4}"
                   r"|0\d{2,4} \d{3,4} \d{3,4})(?![\w.-]*\d)")
EMAIL_MARK, PHONE_MARK = "[email]", "[phone]"


def redact(text: str) -> str:
    """``text`` with every e-mail address replaced by [email] and every phone number by [phone]."""
    return PHONE.sub(PHONE_MARK, EMAIL.sub(EMAIL_MARK, text))


def redact_messages(messages: list[dict]) -> list[dict]:
    return [{**m, "content": redact(m["content"])} if isinstance(m.get("content"), str) else m for m in messages]
