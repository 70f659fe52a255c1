"""The remote endpoints of one ConnManager: one owner, one lock, atomic operations.

Each operation decides, under the table's lock, what endpoint monitors must be told, and
queues it; :meth:`EndpointTable.tell` then tells the queued notices in the order they were
decided, from whichever thread calls it. So monitors hear READY and DISCONNECTED of a name
in the order things happened, never a DISCONNECTED of a name whose READY they did not hear,
and never a READY after the loss that undid it.

Readers on the send path (:meth:`get`) take no lock: an entry is published only once it is
READY and has its connection.
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from .endpoint import Endpoint, EndpointState
from .errors import CommError
from .handshake import PeerHello

if TYPE_CHECKING:
    from .sfm_connection import SfmConnection

log = logging.getLogger(__name__)


class SfmEndpoint:
    """A remote endpoint and the SFM connections to it."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.connections: list[SfmConnection] = []
        # next() on itertools.count is atomic under the GIL: no lock on the send path.
        self.stream_ids = itertools.count(17)

    def next_stream_id(self) -> int:
        """The next stream id: 17, 18, ... wrapping at 0xFFFF, as the original numbers them."""
        return next(self.stream_ids) & 0xFFFF

    def pick_connection(self, stream_id: int) -> SfmConnection | None:
        """The connection for a stream id (``stream_id % n``, as the original picks)."""
        conns = self.connections
        if not conns:
            return None
        return conns[stream_id % len(conns)]


class Registration(NamedTuple):
    """What :meth:`EndpointTable.register` did: the endpoint, and the connections it replaced."""

    sfm_ep: SfmEndpoint
    replaced: list[SfmConnection]


class EndpointTable:
    """Name -> :class:`SfmEndpoint`, with the notices its changes owe to monitors."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._endpoints: dict[str, SfmEndpoint] = {}
        #: Name -> endpoint, to read without a lock (the send path); change it only through
        #: the methods below.
        self.by_name = self._endpoints
        # Names whose READY was queued for monitors and no DISCONNECTED since: what they believe.
        self._announced: set[str] = set()
        # (endpoint, the state decided): the endpoint may have moved on by the time it is told.
        self._notices: deque[tuple[Endpoint, EndpointState]] = deque()
        # Held while telling, so notices decided in one order are told in that order.
        self._telling = threading.RLock()

    # -- reading (no lock) -------------------------------------------------------------------

    def get(self, name: str) -> SfmEndpoint | None:
        """The endpoint called ``name``, if it is connected."""
        return self._endpoints.get(name)

    def __len__(self) -> int:
        return len(self._endpoints)

    def names(self) -> list[str]:
        """The names of every connected endpoint."""
        return list(self._endpoints)

    def wait_ready(self, name: str, timeout: float | None) -> Endpoint:
        """Block until ``name`` is READY; ``CommError(TIMEOUT)`` after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while True:
                sfm_ep = self._endpoints.get(name)
                if sfm_ep is not None and sfm_ep.endpoint.state == EndpointState.READY:
                    return sfm_ep.endpoint
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise CommError(CommError.TIMEOUT, f"endpoint {name!r} not READY within {timeout} s")
                self._changed.wait(left)

    # -- changing (atomic) -------------------------------------------------------------------

    def register(self, sfm_conn: SfmConnection, peer: PeerHello, conn_props: dict) -> Registration | None:
        """Make ``sfm_conn`` the one connection of the endpoint ``peer`` names; it is READY.

        As in the original, a new handshake from a name replaces that endpoint's older
        connections (typically half-open ones of a client that reconnected): the caller closes
        them. Returns None if ``sfm_conn`` is already closed (it lost the race with its loss).
        """
        name = peer.name
        with self._lock:
            if sfm_conn.lost:
                return None
            sfm_ep = self._endpoints.get(name)
            if sfm_ep is None:
                sfm_ep = SfmEndpoint(Endpoint(name, peer.properties, conn_props))
                replaced = []
            else:
                replaced = sfm_ep.connections
                sfm_ep.endpoint.properties = peer.properties
                sfm_ep.endpoint.conn_props = conn_props
            sfm_ep.connections = [sfm_conn]
            sfm_conn.sfm_endpoint = sfm_ep
            sfm_ep.endpoint.state = EndpointState.READY
            # Published only once usable: get() takes no lock.
            self._endpoints[name] = sfm_ep
            self._changed.notify_all()
        return Registration(sfm_ep, replaced)

    def undo(self, sfm_conn: SfmConnection, registration: Registration) -> None:
        """READY could not be sent on ``sfm_conn``: give the endpoint back the connections it
        replaced, which still work (a new endpoint goes when ``sfm_conn`` closes, untold)."""
        with self._lock:
            sfm_ep, replaced = registration
            if replaced and sfm_ep.connections == [sfm_conn]:
                sfm_ep.connections = replaced
                sfm_conn.sfm_endpoint = None

    def announce(self, registration: Registration) -> None:
        """The handshake is complete: queue READY for monitors, unless they believe it already."""
        sfm_ep = registration.sfm_ep
        name = sfm_ep.endpoint.name
        with self._lock:
            if self._endpoints.get(name) is not sfm_ep or name in self._announced:
                return  # lost meanwhile (monitors never hear of it), or known READY
            self._announced.add(name)
            self._notices.append((sfm_ep.endpoint, EndpointState.READY))

    def forget(self, sfm_conn: SfmConnection) -> SfmEndpoint | None:
        """``sfm_conn`` closed: drop it; return its endpoint if that has no connection left."""
        with self._lock:
            sfm_conn.lost = True
            sfm_ep = sfm_conn.sfm_endpoint
            if sfm_ep is None:
                return None
            sfm_ep.connections = [c for c in sfm_ep.connections if c is not sfm_conn]
            name = sfm_ep.endpoint.name
            if sfm_ep.connections or self._endpoints.get(name) is not sfm_ep:
                return None  # other connections remain, or a newer one replaced this endpoint
            del self._endpoints[name]
            endpoint = sfm_ep.endpoint
            endpoint.state = EndpointState.DISCONNECTED
            for i, (queued, _state) in enumerate(self._notices):
                if queued is endpoint:
                    # Its READY is not told yet: monitors never hear of it at all.
                    del self._notices[i]
                    self._announced.discard(name)
                    break
            self._changed.notify_all()
            return sfm_ep

    def gone(self, sfm_ep: SfmEndpoint) -> None:
        """Queue DISCONNECTED for an endpoint :meth:`forget` returned, once its frames are
        delivered; not if monitors never heard its READY, or if the name is back meanwhile."""
        name = sfm_ep.endpoint.name
        with self._lock:
            if name in self._endpoints or name not in self._announced:
                return
            self._announced.discard(name)
            self._notices.append((sfm_ep.endpoint, EndpointState.DISCONNECTED))

    # -- telling -----------------------------------------------------------------------------

    def tell(self, notify: Callable[[Endpoint], None]) -> None:
        """Tell ``notify`` every queued notice, in order (any thread; reentrant)."""
        with self._telling:
            while True:
                with self._lock:
                    if not self._notices:
                        return
                    endpoint, state = self._notices.popleft()
                # A copy in the state decided: the live endpoint may move on while monitors
                # are being told (a READY must not read as DISCONNECTED to the second one).
                snapshot = copy.copy(endpoint)
                snapshot.state = state
                notify(snapshot)
