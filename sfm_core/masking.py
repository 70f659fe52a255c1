"""Secrets kept out of what sfm prints and logs: URL passwords and pasted PEM blocks."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/@:'\"]*:)(?P<secret>[^\s/@'\"]*)@")
_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]+-----.*?(-----END [A-Z0-9 ]+-----|$)", re.S)


def mask_urls(text: str) -> str:
    """``text`` with the password of every URL in it masked (``tcp://user:***@host:1``), and
    nothing else changed (what a command prints: tables, JSON, a peer's properties)."""
    return _URL_PASSWORD.sub(lambda m: f"{m.group('head')}***@", text)


def mask(text: str) -> str:
    """:func:`mask_urls`, and any PEM block (key contents pasted where a path belongs) left
    out, to its END line or, cut short, to the end of ``text`` (log lines, config errors)."""
    return _PEM.sub("<PEM contents, not shown>", mask_urls(text))


class MaskingFilter(logging.Filter):
    """A logging filter (put it on handlers) that masks (:func:`mask`) each record's message
    and the traceback it carries."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        masked = mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_text:  # formatted by a handler before this one
            record.exc_text = mask(record.exc_text)
        elif record.exc_info:
            # Formatters print exc_text when it is set: the masked traceback, not the raw one
            # (in the default layout; a formatter that formats exc_info itself is not covered).
            record.exc_text = mask(logging.Formatter().formatException(record.exc_info))
        return True


@contextmanager
def masked_logging(logger: logging.Logger | None = None) -> Iterator[None]:
    """Mask every record the handlers of ``logger`` (the root logger) emit in the block; the
    filters are taken off again after it."""
    handlers = (logger or logging.getLogger()).handlers
    added = []
    for handler in handlers:
        if not any(isinstance(f, MaskingFilter) for f in handler.filters):
            f = MaskingFilter()
            handler.addFilter(f)
            added.append((handler, f))
    try:
        yield
    finally:
        for handler, f in added:
            handler.removeFilter(f)
