"""The one exception type of sfm: :class:`CommError`, with a code saying what kind of failure."""

from __future__ import annotations


class CommError(Exception):
    """A communication failure. ``code`` is one of the class constants below.

    The codes are the ones NVFlare's F3 uses, so code written against it keeps working.
    """

    ERROR = "ERROR"
    NOT_READY = "NOT_READY"
    BAD_DATA = "BAD_DATA"
    BAD_CONFIG = "BAD_CONFIG"
    CLOSED = "CLOSED"
    NOT_SUPPORTED = "NOT_SUPPORTED"
    TIMEOUT = "TIMEOUT"

    def __init__(self, code: str, message: str | None = None) -> None:
        self.code = code
        self.message = message
        super().__init__(f"Code: {code} Error: {message}" if message else f"Code: {code}")


class HandshakeRefused(CommError):
    """The listener refused our handshake and said why (the ``refusal`` extension between
    sfm peers). Its code is ``ERROR``; ``message`` is the listener's reason."""

    def __init__(self, message: str) -> None:
        super().__init__(CommError.ERROR, message)
