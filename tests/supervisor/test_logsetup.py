from __future__ import annotations

import io
import json
import logging
import sys

import pytest
from loguru import logger

from actors.logsetup import SESSION_MASK, close_logging, redact, setup_logging

SESSION = "1" + "AbCdEfGh0123456789_-" * 18 + "=="  # StringSession-shaped (>350 chars)


@pytest.fixture
def captured():
    buf = io.StringIO()
    setup_logging("DEBUG", stream=buf)
    yield buf
    close_logging()
    logger.add(sys.stderr)  # leave loguru as other tests expect it


def test_redact_phone_variants():
    for phone in ("+15551234567", "+7 912 345-67-89", "+447911123456"):
        out = redact(f"login {phone} ok")
        assert phone not in out and "*" in out
    assert redact("port 9464 and id 123456789") == "port 9464 and id 123456789"


def test_redact_session_string():
    assert redact(f"session={SESSION} end") == f"session={SESSION_MASK} end"


def test_logged_phone_number_is_redacted(captured):
    logger.bind(account="alice").info("signed in as +15551234567")
    out = captured.getvalue()
    assert "+15551234567" not in out
    assert "5551234567" not in out
    assert "+155*****67" in out
    assert "[alice]" in out


def test_stdlib_records_are_routed_and_redacted(captured):
    logging.getLogger("telethon.test").warning("phone %s session %s", "+15551234567", SESSION)
    out = captured.getvalue()
    assert "telethon.test" in out
    assert "+15551234567" not in out and SESSION not in out and SESSION_MASK in out


def test_traceback_is_redacted(captured):
    try:
        raise ValueError("bad phone +15551234567")
    except ValueError:
        logger.exception("failed")
    out = captured.getvalue()
    assert "Traceback" in out and "+15551234567" not in out


def test_level_filters(captured):
    setup_logging("WARNING", stream=captured)
    logger.info("quiet please")
    logger.warning("loud")
    assert "quiet please" not in captured.getvalue() and "loud" in captured.getvalue()


def test_json_lines_and_file(tmp_path):
    path = tmp_path / "logs" / "stashd.log"
    setup_logging("INFO", log_file=path, json=True)
    try:
        logger.bind(actor="x").info("call +15551234567")
    finally:
        close_logging()
    line = path.read_text().strip().splitlines()[-1]
    rec = json.loads(line)
    assert "+15551234567" not in line
    assert rec["record"]["extra"]["actor"] == "x"
