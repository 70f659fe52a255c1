"""Secrets kept out of what sfm prints and logs: URL passwords and pasted PEM blocks."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/@:'\"]*:)(?P<secret>[^\s/@'\"]*)@")
_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]+-----.*?(-----END [A-Z0-9 ]+-----|$)", re.S)


def mask(text: str) -> str:
    """``text`` with the password of every URL in it masked (``tcp://user:***@host:1``) and
    any PEM block (key contents pasted where a path belongs) left out."""
    text = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}***@", text)
    return _PEM.sub("<PEM contents, not shown>", text)


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
        if record.exc_info and not record.exc_text:
            # A formatter prints exc_text when it is set: the masked traceback, not the raw one.
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
