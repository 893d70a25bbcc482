"""Secrets out of every message: passwords in URLs, and the values of configured secrets.

`redact` cleans one string; `install` makes every log record of the process pass through it
(at record creation, so that every handler, uvicorn's included, sees only clean text).
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Iterable

#: `scheme://user:password@` or `scheme://:password@` in any URL.
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)(?P<secret>[^@\s/]+)(?=@)")
MASK = "***"

_secrets: set[str] = set()


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with URL passwords and every known secret (installed or given) masked."""
    text = _URL_PASSWORD.sub(lambda m: m["head"] + MASK, text)
    for secret in sorted({*_secrets, *secrets}, key=len, reverse=True):
        if secret:
            text = text.replace(secret, MASK)
    return text


def install(secrets: Iterable[str | None] = ()) -> None:
    """Redact every log record from now on; `secrets` (tokens, passwords) are masked wherever they appear."""
    _secrets.update(s for s in secrets if s and len(s) >= 4)
    previous = logging.getLogRecordFactory()
    if getattr(previous, "redacting", False):
        return

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            record.msg, record.args = redact(record.getMessage()), None
        except Exception:  # a broken format string: leave the record for logging to report
            return record
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip())
        return record

    factory.redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
