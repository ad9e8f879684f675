from __future__ import annotations

import pytest

from storage.redact import redact_phone


@pytest.mark.parametrize(
    "phone, expected",
    [
        ("+15551234567", "+155*****67"),
        ("15551234567", "+155*****67"),  # Telegram's get_me().phone has no "+"
        ("+44 7911 123456", "+447*****56"),
        (15551234567, "+155*****67"),
        ("12345", "+*****"),
        ("", None),
        (None, None),
        ("+155*****67", "+155*****67"),  # idempotent
    ],
)
def test_redact_phone(phone, expected):
    assert redact_phone(phone) == expected


def test_redaction_hides_the_length():
    assert len(redact_phone("+15551234567")) == len(redact_phone("+155512345678901"))
