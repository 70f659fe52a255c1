"""The contracts a transport driver implements: Driver, Connection, FrameReceiver, ConnMonitor.

A driver moves whole frames; it knows nothing of endpoints, handshakes or messages. The
core (``ConnManager``) calls a driver from a connector thread:

* ``Mode.PASSIVE``: ``driver.listen(connector)`` blocks while it accepts connections, until
  ``driver.shutdown()``. It calls ``connector.listening(url)`` once it accepts.
* ``Mode.ACTIVE``: ``driver.connect(connector)`` blocks for the life of one connection and
  returns (or raises ``CommError``) when it ends; the core reconnects with backoff.

For each connection the driver calls :meth:`Driver.add_connection` (the core then registers
a :class:`FrameReceiver` on it and starts the handshake), hands every received frame to
:meth:`Connection.process_frames`, and calls :meth:`Driver.remove_connection` when it ends.
"""

from __future__ import annotations

import itertools
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import CommError
from .frames import Payload
from .limits import ListenerLimits, Slot
from .url import format_url

if TYPE_CHECKING:
    from .driver_params import Param

log = logging.getLogger(__name__)


class Mode(str, Enum):
    """How a connector runs: ACTIVE connects (and reconnects), PASSIVE listens."""

    ACTIVE = "active"
    PASSIVE = "passive"


class ConnState(str, Enum):
    """State of one driver connection."""

    IDLE = "idle"
    CONNECTED = "connected"
    CLOSED = "closed"


class ConnectorInfo:
    """One connector: a driver, its params and mode, and its run state."""

    def __init__(self, handle: str, driver: Driver, params: dict, mode: Mode) -> None:
        self.handle = handle
        self.driver = driver
        self.params = params
        self.mode = mode
        self.total_conns = 0
        self.curr_conns = 0
        self.started = False
        self.stopping = False
        #: The URL peers can use, set by the driver once it listens (actual port if 0 was asked).
        self.url: str | None = None
        #: The last error of this connector (bind failure, connect failure), or None.
        self.error: BaseException | None = None
        #: A listener's connection limits (``max_connections``, ``max_handshakes``); None when active.
        self.limits: ListenerLimits | None = None
        if mode == Mode.PASSIVE:
            self.limits = ListenerLimits.from_params(params, f"{params.get('scheme', 'sfm')} listener {handle}")
        self._listening = threading.Event()

    def listening(self, url: str) -> None:
        """Drivers call this once a listener accepts connections, with its real URL."""
        self.url = url
        self._listening.set()

    def failed(self, error: BaseException) -> None:
        """Record an error; wakes anyone waiting for the listener."""
        self.error = error
        self._listening.set()

    def admit(self, peer: str = "?") -> Slot | None:
        """A listener's slot for a new connection from ``peer``, or None (logged) if the
        listener is full: the driver then closes that connection at once. Drivers that accept
        sockets themselves call it right after ``accept()``, before any TLS, and set
        :attr:`Connection.slot`; :meth:`Driver.add_connection` takes one otherwise."""
        return self.limits.admit(peer) if self.limits is not None else None

    def wait_listening(self, timeout: float | None = None) -> str:
        """Block until a passive connector listens; return its URL or raise its error."""
        if not self._listening.wait(timeout):
            raise CommError(CommError.TIMEOUT, f"connector {self.handle} not listening after {timeout} s")
        if self.url is None:
            raise CommError(CommError.ERROR, f"connector {self.handle} failed: {self.error}")
        return self.url

    def __repr__(self) -> str:
        return f"ConnectorInfo({self.handle}, {self.params.get('url') or self.params.get('scheme')}, {self.mode.value})"


class FrameReceiver(ABC):
    """Consumes the frames of one connection, in order."""

    @abstractmethod
    def process_frame(self, frame: Payload) -> None:
        """Take one whole frame. Raises ``CommError`` if the frame is bad (the driver then closes)."""

    def process_frames(self, frames: Sequence[Payload]) -> None:
        """Take a batch of whole frames received together (cheaper than one call each)."""
        for frame in frames:
            self.process_frame(frame)

    def bytes_received(self) -> None:
        """Bytes of a frame not yet complete arrived: the peer is alive (a slow large frame
        must not look like a dead peer). Optional for drivers; cheap to call."""

    def bytes_sent(self) -> None:
        """A send that had to wait for the transport made progress: the peer is reading (a
        slow receiver must not look like a dead peer). Optional for drivers; call it when
        bytes leave after a wait, not on every send; cheap to call, from any thread."""


class Connection(ABC):
    """One transport connection that carries whole frames.

    The core never calls :meth:`send_frame` concurrently on one connection, so a driver needs
    no send lock of its own. A driver that can stop reading on demand sets
    ``supports_pause = True`` and implements :meth:`pause_reading`/:meth:`resume_reading`;
    the core then applies backpressure by pausing instead of blocking in ``process_frames``.

    A driver whose receiving thread serves only this connection while it is in
    ``process_frames`` (a thread per connection, or an EPOLLONESHOT pool) sets
    ``inline_delivery = True``: the core then delivers the frames on that very thread, with
    no hand-off (a slow receiver then simply stops this connection's reading). Everyone else
    (an event loop serving many connections) gets an ordered, bounded queue per connection.
    """

    supports_pause: ClassVar[bool] = False
    inline_delivery: ClassVar[bool] = False
    _ids = itertools.count(1)
    #: This connection's place in its listener's limits (see :meth:`ConnectorInfo.admit`).
    slot: Slot | None = None

    def __init__(self, connector: ConnectorInfo | None) -> None:
        self.name = f"CN{next(Connection._ids):05d}"
        self.state = ConnState.IDLE
        self.frame_receiver: FrameReceiver | None = None
        self.connector = connector
        #: Extensions agreed with the peer in the handshake (set by the core).
        self.extensions: frozenset[str] = frozenset()

    @abstractmethod
    def get_conn_properties(self) -> dict:
        """Connection properties: ``peer_addr``, ``local_addr``, TLS details, ..."""

    @abstractmethod
    def close(self) -> None:
        """Close the transport. Idempotent; the driver then calls ``remove_connection``."""

    @abstractmethod
    def send_frame(self, frame: Payload) -> None:
        """Send one whole frame, given as one buffer or a list of buffers to send back to back.

        Blocks while the transport cannot take more (backpressure) and raises
        ``CommError(CLOSED)``/``CommError(TIMEOUT)`` when the frame cannot be sent, also when
        :meth:`close` is called while it blocks (other senders wait for it). Once it
        returns, the caller may reuse its buffers: a driver may keep ``bytes`` to send later,
        but never a writable buffer (copy it, or send it before returning).
        """

    def register_frame_receiver(self, receiver: FrameReceiver) -> None:
        self.frame_receiver = receiver

    def process_frame(self, frame: Payload) -> None:
        """Hand one received frame to the receiver (drivers call this)."""
        receiver = self.frame_receiver
        if receiver is None:
            raise CommError(CommError.NOT_READY, f"connection {self.name} has no frame receiver")
        receiver.process_frame(frame)

    def process_frames(self, frames: Sequence[Payload]) -> None:
        """Hand a batch of received frames to the receiver (drivers call this)."""
        receiver = self.frame_receiver
        if receiver is None:
            raise CommError(CommError.NOT_READY, f"connection {self.name} has no frame receiver")
        receiver.process_frames(frames)

    def send_urgent(self, frame: bytes) -> bool:
        """Send a small control frame (PING, PONG) ahead of data frames still queued here.

        Optional. A driver that queues frames before writing them (an event-loop driver)
        implements it so a heartbeat never waits behind its queue: put ``frame`` out at the
        next frame boundary, before queued data, even while another thread is blocked in
        :meth:`send_frame`; never block; any thread. Return True if taken. The default
        returns False, and the core then sends the frame with :meth:`send_frame` right after
        the send in progress, which is the next frame boundary for a driver that writes
        before ``send_frame`` returns.
        """
        return False

    def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` s until every frame :meth:`send_frame` accepted is handed to
        the transport (the kernel); return how many are still waiting (0: all written).

        The core calls it before closing on ``stop()`` and ``remove_endpoint()`` (the
        linger), so a message ``send_message`` accepted is not dropped silently. The default
        returns 0: right for a driver whose ``send_frame`` writes before it returns.
        """
        return 0

    def offered_extensions(self) -> Sequence[str]:
        """Protocol extensions this connection can use if the peer agrees (see wire doc)."""
        return ()

    def pause_reading(self) -> None:
        """Stop reading from the transport until :meth:`resume_reading` (any thread may call)."""

    def resume_reading(self) -> None:
        """Start reading again after :meth:`pause_reading`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, {self.state.value})"


class ConnMonitor(ABC):
    """Told when a driver connection is created (CONNECTED) or ends (CLOSED)."""

    @abstractmethod
    def state_change(self, connection: Connection) -> None:
        """Called by drivers on their own threads; must not block for long."""


class Driver(ABC):
    """A transport driver. Subclass it, implement the abstract methods, register an entry point.

    The base class keeps the connection bookkeeping: call :meth:`add_connection` when a
    connection is up and :meth:`remove_connection` when it ends; :meth:`shutdown` of a
    subclass should stop listening and call ``super().shutdown()`` to close what is left.
    """

    def __init__(self) -> None:
        self.conn_monitor: ConnMonitor | None = None
        self._conns: dict[str, Connection] = {}
        self._conns_lock = threading.Lock()

    @staticmethod
    @abstractmethod
    def supported_transports() -> list[str]:
        """URL schemes this driver serves, e.g. ``["tcp", "stcp"]``."""

    @staticmethod
    @abstractmethod
    def capabilities() -> dict[str, Any]:
        """What the driver can do, e.g. ``{"max_frame_size": ..., "tls": True}``."""

    @abstractmethod
    def listen(self, connector: ConnectorInfo) -> None:
        """Accept connections until :meth:`shutdown`. Call ``connector.listening(url)`` when ready."""

    @abstractmethod
    def connect(self, connector: ConnectorInfo) -> None:
        """Open one connection and block until it ends. Raise ``CommError`` if it cannot connect."""

    @classmethod
    def parameters(cls) -> Sequence[Param] | None:
        """The connector parameters this driver takes (:class:`sfm_core.driver_params.Param`),
        besides the core's own (``sfm_core.driver_params.CORE_PARAMS``: URL parts,
        ``max_frame_size``, TLS, a listener's limits). ``add_connector`` then refuses any
        other key, a bad value, or a parameter given to the wrong mode, as
        ``CommError(BAD_CONFIG)``. Optional; the default, None, checks only the core's
        parameters and lets every other key through (drivers written before declarations)."""
        return None

    def validate(self, params: dict, mode: Mode) -> None:
        """Check a connector's params before anything starts; raise ``CommError(BAD_CONFIG)``
        naming what is wrong. ``add_connector`` calls it, so a mistake (a bad value, a TLS
        file that cannot be read) is reported to the caller, not logged from a driver
        thread. Optional; the default accepts everything."""

    def reload_tls(self) -> None:
        """Read the TLS files again: new connections use them, live ones go on. Called by
        ``ConnManager.reload_tls()``; raise ``CommError(BAD_CONFIG)`` (keeping the old
        settings) if the new files are wrong. Optional; the default does nothing."""

    def shutdown(self) -> None:
        """Stop listening/connecting and close every connection of this driver."""
        for conn in self.connections():
            try:
                conn.close()
            except Exception:  # one bad connection must not keep the others open
                log.exception("error closing %s", conn)

    @classmethod
    def get_urls(cls, scheme: str, resources: dict) -> tuple[str, str]:
        """Active and passive URLs for ``resources`` (``host``, ``port``)."""
        host = str(resources.get("host") or "localhost")
        port = int(resources.get("port") or 0)
        return format_url(scheme, host, port), format_url(scheme, "0", port)

    def register_conn_monitor(self, monitor: ConnMonitor) -> None:
        self.conn_monitor = monitor

    def connections(self) -> list[Connection]:
        with self._conns_lock:
            return list(self._conns.values())

    def add_connection(self, conn: Connection) -> bool:
        """Record a new connection and tell the monitor (which registers a frame receiver).

        A listener's connection without a :attr:`Connection.slot` takes one here; if the
        listener is full, the connection is closed instead and False returned."""
        connector = conn.connector
        if conn.slot is None and connector is not None and connector.limits is not None:
            conn.slot = connector.admit(str(conn.get_conn_properties().get("peer_addr", "?")))
            if conn.slot is None:
                conn.close()
                return False
        with self._conns_lock:
            self._conns[conn.name] = conn
        conn.state = ConnState.CONNECTED
        if conn.connector is not None:
            conn.connector.total_conns += 1
            conn.connector.curr_conns += 1
        if self.conn_monitor is not None:
            self.conn_monitor.state_change(conn)
        return True

    def remove_connection(self, conn: Connection) -> None:
        """Forget a connection that ended (releasing its slot) and tell the monitor, once.

        Call it for every connection that took a slot, even one never added."""
        if conn.slot is not None:
            conn.slot.release()
        with self._conns_lock:
            known = self._conns.pop(conn.name, None) is not None
        if not known:
            return
        conn.state = ConnState.CLOSED
        if conn.connector is not None:
            conn.connector.curr_conns -= 1
        if self.conn_monitor is not None:
            self.conn_monitor.state_change(conn)
