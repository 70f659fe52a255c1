"""Messages an endpoint sends to itself: delivered in order, like received ones."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from . import frames as fr
from .driver import Connection
from .endpoint import Endpoint
from .frames import Payload
from .message import Message, MessageReceiver

log = logging.getLogger(__name__)


class LoopbackMessage:
    """A message to ourselves, queued on the loopback lane (sized by its payload)."""

    __slots__ = ("app_id", "endpoint", "headers", "payload")

    def __init__(self, endpoint: Endpoint, app_id: int, headers: dict | None, payload: Payload | None) -> None:
        self.endpoint, self.app_id, self.headers, self.payload = endpoint, app_id, headers, payload

    def __len__(self) -> int:
        return fr.payload_length(self.payload)


def deliver_loopback(
    receivers: Mapping[int, MessageReceiver],
    local: Endpoint,
    conn: Connection,
    app_id: int,
    headers: dict | None,
    payload: Payload | None,
) -> None:
    """Hand a loopback message to its receiver, with the payload type of a received one."""
    receiver = receivers.get(app_id)
    if receiver is None:
        log.debug("%s: no receiver for loopback app_id %d", local.name, app_id)
        return
    if payload is not None and not isinstance(payload, (bytes, bytearray, memoryview)):
        payload = b"".join(payload)
    view = memoryview(payload) if payload is not None and len(payload) else None
    try:
        receiver.process_message(local, conn, app_id, Message(headers or None, view))
    except Exception:
        log.exception("%s: loopback receiver for app_id %d failed", local.name, app_id)
