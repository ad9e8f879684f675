"""Phone number redaction: the only form in which a phone reaches storage or logs."""
from __future__ import annotations

_MASK = "*****"


def redact_phone(phone: str | int | None) -> str | None:
    """Keep the country-code-ish prefix and the last two digits.

    ``"+15551234567"`` and Telegram's ``"15551234567"`` both give ``"+155*****67"``.
    The mask has a fixed width so the number's length is not revealed either.
    An already redacted value (containing ``*``) is returned unchanged.
    """
    if phone is None:
        return None
    text = str(phone).strip()
    if not text:
        return None
    if "*" in text:
        return text
    digits = "".join(ch for ch in text if ch.isdigit())
    if len(digits) < 7:
        return "+" + _MASK
    return f"+{digits[:3]}{_MASK}{digits[-2:]}"
