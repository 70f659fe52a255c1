"""How many connections one listener holds, and how many of them are still in a handshake.

A listener on the open internet must bound what strangers can make it hold. Every accepted
connection takes a :class:`Slot` from its listener's :class:`ListenerLimits` (drivers that
accept sockets themselves take it at ``accept()``, before any TLS; the others get one in
:meth:`Driver.add_connection`). A connection is *handshaking* from then until the core has
answered its HELLO; only ``max_handshakes`` may be at once, which bounds the memory strangers
can make the listener reserve (each may announce a first frame of up to
``sfm_core.frames.HANDSHAKE_MAX_FRAME``). Past either limit, a new connection is closed at
once and the log says which limit and how many were refused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from .params import get_param

log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 4096
DEFAULT_MAX_HANDSHAKES = 256
# A flood of refused connections logs one line per this many seconds, not one per connection.
_LOG_EVERY = 10.0


class Slot:
    """One connection's place in its listener's limits. Both methods are idempotent."""

    __slots__ = ("_handshaking", "_limits", "_open")

    def __init__(self, limits: ListenerLimits) -> None:
        self._limits = limits
        self._open = True
        self._handshaking = True

    def handshaken(self) -> None:
        """The handshake is done: the connection no longer counts against ``max_handshakes``."""
        limits = self._limits
        with limits._lock:
            if self._handshaking:
                self._handshaking = False
                limits.handshaking -= 1

    def release(self) -> None:
        """The connection is gone."""
        limits = self._limits
        with limits._lock:
            if self._open:
                self._open = False
                limits.connections -= 1
                if self._handshaking:
                    self._handshaking = False
                    limits.handshaking -= 1


class ListenerLimits:
    """The connection limits of one listener (connector params ``max_connections`` and
    ``max_handshakes``) and the counts against them."""

    def __init__(
        self,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
        name: str = "listener",
    ) -> None:
        self.max_connections = max_connections
        self.max_handshakes = max_handshakes
        self.name = name
        self.connections = 0
        self.handshaking = 0
        #: Connections refused since the listener started.
        self.refused = 0
        self._lock = threading.Lock()
        self._unlogged = 0
        self._logged_at = -_LOG_EVERY

    @classmethod
    def from_params(cls, params: Mapping[str, Any], name: str = "listener") -> ListenerLimits:
        """The limits given in a connector's params; ``CommError(BAD_CONFIG)`` names a bad one."""
        scheme = str(params.get("scheme") or "sfm")
        return cls(
            get_param(params, "max_connections", int, DEFAULT_MAX_CONNECTIONS, driver=scheme, minimum=1),
            get_param(params, "max_handshakes", int, DEFAULT_MAX_HANDSHAKES, driver=scheme, minimum=1),
            name,
        )

    def admit(self, peer: str = "?") -> Slot | None:
        """A slot for a new connection from ``peer``, or None (logged) if a limit is reached."""
        with self._lock:
            if self.connections >= self.max_connections:
                why = f"max_connections={self.max_connections} connections open"
            elif self.handshaking >= self.max_handshakes:
                why = f"max_handshakes={self.max_handshakes} connections in their handshake"
            else:
                self.connections += 1
                self.handshaking += 1
                return Slot(self)
            self.refused += 1
            self._unlogged += 1
            now = time.monotonic()
            if now - self._logged_at < _LOG_EVERY:
                return None
            self._logged_at, count, self._unlogged = now, self._unlogged, 0
        log.warning(
            "%s: refusing a connection from %s: %s%s",
            self.name,
            peer,
            why,
            f" ({count} refused since the last report)" if count > 1 else "",
        )
        return None
