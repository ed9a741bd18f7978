"""--redact: what it replaces and what it must leave alone (hand-made cases)."""

import pytest

from chatrlhf.serve.redact import redact, redact_messages


@pytest.mark.parametrize("text, expected", [
    ("write to jane.doe+shop@example.co.uk today", "write to [email] today"),
    ("Mail: A_B@mail-server.com.", "Mail: [email]."),
    ("call +44 20 7946 0958 now", "call [phone] now"),
    ("call +1-555-123-4567.", "call [phone]."),
    ("(555) 123-4567 or 555.123.4567", "[phone] or [phone]"),
    ("my number is 555-123-4567", "my number is [phone]"),
    ("office 020 7946 0958", "office [phone]"),
])
def test_redact_catches_emails_and_phones(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize("text", [
    "order #123456789 was shipped", "order 12345678901", "it costs $1,299.99 or €45.50", "on 2024-05-01",
    "tracking 1Z999AA10123456784", "version 1.2.3", "room 404, floor 3", "12:30-14:45", "call me @ noon",
    "twitter @jane", "ISBN 978-3-16-148410-0", "reference 2024-123-4567-89",
])
def test_redact_leaves_order_numbers_prices_and_dates(text):
    assert redact(text) == text


def test_redact_messages_keeps_roles_and_non_text_parts():
    msgs = [{"role": "user", "content": "I am bob@x.org"}, {"role": "assistant", "content": None}]
    assert redact_messages(msgs) == [{"role": "user", "content": "I am [email]"}, {"role": "assistant",
                                                                                  "content": None}]
