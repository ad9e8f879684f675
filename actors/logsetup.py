"""Logging, configured once by the supervisor: loguru sinks, stdlib routed in, secrets redacted.

- one loguru sink (stderr or a file), a level, optional JSON lines;
- stdlib ``logging`` (pykka, Telethon, ...) is forwarded into loguru by
  :class:`InterceptHandler`;
- every record passes :func:`redact`, which masks phone-number-like strings
  (``+`` and 7..15 digits, separators allowed) and anything that looks like a
  Telethon ``StringSession``. Redaction runs twice: on the record (so every sink
  sees a clean message and clean ``extra`` values) and on the final text of our
  sink (so exception tracebacks are covered too).
"""
from __future__ import annotations

import logging
import re
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

from loguru import logger

try:
    from storage.redact import redact_phone as _redact_phone
except ImportError:  # pragma: no cover - storage not installed
    def _redact_phone(phone: str) -> str:
        digits = "".join(ch for ch in phone if ch.isdigit())
        return f"+{digits[:3]}*****{digits[-2:]}"

# "+" then 7..15 digits, optionally split by single spaces, dashes, dots or parentheses.
PHONE_RE = re.compile(r"(?<![\w+])\+(?:[\s\-.()]?\d){7,15}(?!\d)")
# Telethon StringSession: version char "1" + urlsafe base64 of >= 263 bytes (>= 350 chars).
# Any long base64-ish run is masked: no legitimate log line carries one.
SESSION_RE = re.compile(r"(?<![A-Za-z0-9_\-+/])[A-Za-z0-9_\-+/]{200,}={0,2}")
SESSION_MASK = "<redacted-session>"

FORMAT = ("{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {extra[actor]}{extra[account_tag]} "
          "{name}:{line} - {message}")

_lock = threading.Lock()
_handler_ids: list[int] = []


def redact(text: str) -> str:
    """Mask phone numbers and session strings in ``text``."""
    if not text:
        return text
    if "+" in text:
        text = PHONE_RE.sub(lambda m: _redact_phone(m.group(0)), text)
    if len(text) >= 200:
        text = SESSION_RE.sub(SESSION_MASK, text)
    return text


def _patch(record: dict[str, Any]) -> None:
    record["message"] = redact(record["message"])
    extra = record["extra"]
    for key, value in list(extra.items()):
        if isinstance(value, str):
            extra[key] = redact(value)
    extra.setdefault("actor", "-")
    account = extra.get("account")
    extra["account_tag"] = f"[{account}]" if account else ""


class _RedactingSink:
    """Writes loguru's formatted text (tracebacks included) after redaction."""

    def __init__(self, stream: TextIO, close: bool = False):
        self._stream = stream
        self._close = close

    def write(self, message: str) -> None:
        self._stream.write(redact(message))
        self._stream.flush()

    def stop(self) -> None:
        if self._close:
            self._stream.close()


class InterceptHandler(logging.Handler):
    """Forwards stdlib logging records into loguru (the recipe from loguru's README)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        frame, depth = logging.currentframe(), 2
        while frame is not None and frame.f_code.co_filename == logging.__file__:
            frame = frame.f_back
            depth += 1
        logger.opt(depth=depth, exception=record.exc_info).bind(actor=record.name).log(
            level, record.getMessage())


def setup_logging(level: str = "INFO", *, log_file: Path | str | None = None, json: bool = False,
                  stream: TextIO | None = None) -> None:
    """(Re)configure logging for the whole process. Safe to call again (SIGHUP)."""
    level = level.upper()
    with _lock:
        logger.remove()
        _handler_ids.clear()
        logger.configure(patcher=_patch, extra={"actor": "-", "account_tag": ""})
        if log_file is not None:
            path = Path(log_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            sink = _RedactingSink(open(path, "a", encoding="utf-8", buffering=1), close=True)
        else:
            sink = _RedactingSink(stream or sys.stderr)
        _handler_ids.append(logger.add(sink.write, level=level, format=FORMAT, serialize=json,
                                       backtrace=False, diagnose=False, enqueue=False,
                                       catch=True))
        _sinks.append(sink)
        # Route stdlib logging through loguru.
        root = logging.getLogger()
        root.handlers[:] = [InterceptHandler()]
        root.setLevel(logging.getLevelName(level) if level in _STDLIB_LEVELS else logging.INFO)
        # Telethon is chatty at DEBUG/INFO about connections; keep it at WARNING unless debugging.
        logging.getLogger("telethon").setLevel(logging.DEBUG if level in ("TRACE", "DEBUG") else logging.WARNING)


def set_level(level: str, **kwargs: Any) -> None:
    """Change the level (SIGHUP); other options as in :func:`setup_logging`."""
    setup_logging(level, **kwargs)


def close_logging() -> None:
    with _lock:
        logger.remove()
        while _sinks:
            _sinks.pop().stop()


_sinks: list[_RedactingSink] = []
_STDLIB_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
