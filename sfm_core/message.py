"""Application messages and the receivers they are delivered to."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .driver import Connection
    from .endpoint import Endpoint


class Message:
    """Headers and payload of one application message.

    A received payload is a ``memoryview`` over the received frame (no copy), or ``None``
    when the sender sent no bytes; it is the same type on every driver.
    """

    __slots__ = ("headers", "payload")

    def __init__(self, headers: dict | None = None, payload: Any = None) -> None:
        self.headers = headers
        self.payload = payload

    def get_header(self, key: str, default: Any = None) -> Any:
        return self.headers.get(key, default) if self.headers else default

    def __repr__(self) -> str:
        size = None if self.payload is None else len(self.payload)
        return f"Message(headers={self.headers!r}, payload_len={size})"


class MessageReceiver(ABC):
    """Receives the DATA messages of one app_id, in the order each connection delivered them."""

    @abstractmethod
    def process_message(self, endpoint: Endpoint, connection: Connection, app_id: int, message: Message) -> None:
        """Called in order, one message of a connection at a time: on the driver's I/O thread
        for inline drivers (TCP), else on a delivery thread. Blocking here slows the sender."""
