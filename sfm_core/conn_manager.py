"""ConnManager: the SFM connections of one local endpoint, and the messages through them.

How a frame flows (see docs/architecture.md): ``send_message`` encodes a head (prefix +
headers) and hands ``[head, payload...]`` to the driver connection without copying the
payload. A driver's I/O thread hands received frames to :class:`SfmFrameReceiver`, which
queues them on the connection's ordered lane; a delivery thread decodes each frame and runs
the handshake, heartbeat or the app's :class:`MessageReceiver`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import random
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack

from . import frames as fr
from .delivery import Dispatcher, Lane
from .driver import Connection, ConnectorInfo, ConnMonitor, ConnState, Driver, FrameReceiver, Mode
from .endpoint import Endpoint, EndpointMonitor, EndpointState
from .errors import CommError
from .frames import FrameType, Payload
from .handshake import build_handshake, decode_ping_payload, negotiate, parse_handshake, validate_endpoint_name
from .message import Message, MessageReceiver
from .plugins import broadcast
from .registry import DriverRegistry, get_registry
from .url import parse_url

log = logging.getLogger(__name__)

_PING_PAYLOAD = b"\xc0"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*$")  # msgpack nil, as the original sends


_handle_lock = threading.Lock()
_handle_count = 0


def get_handle() -> str:
    """A new connector handle, unique in this process (``CH00001``, ...)."""
    global _handle_count
    with _handle_lock:
        _handle_count += 1
        return f"CH{_handle_count:05d}"


class SfmEndpoint:
    """A remote endpoint and the SFM connections to it."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.connections: list[SfmConnection] = []
        #: Monitors were told it is READY (under the manager's notify lock): only then is its
        #: loss news to them.
        self.told_ready = False
        # next() on itertools.count is atomic under the GIL: no lock on the send path.
        self._stream_ids = itertools.count(17)

    def next_stream_id(self) -> int:
        """The next stream id: 17, 18, ... wrapping at 0xFFFF, as the original numbers them."""
        return next(self._stream_ids) & 0xFFFF

    def pick_connection(self, stream_id: int) -> SfmConnection | None:
        conns = self.connections
        if not conns:
            return None
        return conns[stream_id % len(conns)]


class SfmConnection:
    """One driver connection as the core sees it: sequence numbers, handshake, activity."""

    def __init__(self, conn: Connection, local_endpoint: Endpoint, mode: Mode, max_frame_size: int) -> None:
        self.conn = conn
        self.local_endpoint = local_endpoint
        self.mode = mode
        self.max_frame_size = max_frame_size
        self.sfm_endpoint: SfmEndpoint | None = None
        self.created = time.monotonic()
        self.last_activity = self.created
        self.last_ping = 0.0
        self.lane: Lane | None = None
        #: Set once the core decided to close this connection (bad data, timeout, ...).
        self.closing = False
        self._seq = 0
        # Reentrant: the handshake holds it across recording the endpoint and sending READY.
        self._send_lock = threading.RLock()

    @property
    def name(self) -> str:
        return self.conn.name

    def get_name(self) -> str:
        return self.conn.name

    def send_frame(
        self,
        frame_type: int,
        app_id: int,
        stream_id: int,
        headers: dict | None,
        payload: Payload | None,
        wait: bool = True,
    ) -> bool:
        """Send one frame as ``[head, *payload]``: the payload is never copied.

        This is the send hot path: the head is packed with one struct call under the lock that
        also orders frames on the wire and numbers them. With ``wait=False`` nothing is sent
        (and False returned) when another send holds the connection.
        """
        if headers:
            hb = fr.encode_headers(headers)
        else:
            hb = b""
        if payload is None:
            bufs = []
            size = 0
        elif type(payload) is bytes or type(payload) is bytearray:
            bufs = [payload] if payload else []
            size = len(payload)
        else:
            bufs = fr.payload_buffers(payload)
            size = fr.payload_length(bufs)
        length = fr.PREFIX_LEN + len(hb) + size
        if length > self.max_frame_size:
            fr.check_prefix(length, len(hb), self.max_frame_size)
        if not self._send_lock.acquire(wait):
            return False
        try:
            self._seq = seq = (self._seq + 1) & 0xFFFF
            head = fr.PREFIX.pack(length, len(hb), frame_type, 0, 0, app_id, stream_id, seq)
            self.conn.send_frame([head + hb if hb else head, *bufs])
        except CommError:
            raise
        except Exception as e:
            raise CommError(CommError.ERROR, f"send on {self.conn.name} failed: {type(e).__name__}: {e}") from e
        finally:
            self._send_lock.release()
        return True

    def send_ping(self) -> bool:
        """Send a PING unless a send is in progress (which shows we are not idle); True if sent."""
        sfm_ep = self.sfm_endpoint
        stream_id = sfm_ep.next_stream_id() if sfm_ep is not None else 1
        return self.send_frame(FrameType.PING, 0, stream_id, None, _PING_PAYLOAD, wait=False)

    def send_handshake(self, frame_type: int, extensions: Any = ()) -> None:
        ep = self.local_endpoint
        payload = build_handshake(ep.name, ep.properties, extensions)
        self.send_frame(frame_type, 0, 1, None, payload)

    def close(self) -> None:
        self.closing = True
        self.conn.close()


class NullConnection(Connection):
    """The connection given to receivers of loopback messages (sent to ourselves)."""

    def __init__(self) -> None:
        super().__init__(None)
        self.state = ConnState.CONNECTED

    def get_conn_properties(self) -> dict:
        """Loopback has no transport properties."""
        return {}

    def close(self) -> None:
        """Nothing to close."""

    def send_frame(self, frame: Payload) -> None:
        """Loopback never sends frames."""
        raise CommError(CommError.NOT_SUPPORTED, "NullConnection does not send frames")


class SfmFrameReceiver(FrameReceiver):
    """Takes a connection's frames on the driver's I/O thread and queues them in order."""

    def __init__(self, conn_manager: ConnManager, conn: SfmConnection) -> None:
        self.conn_manager = conn_manager
        self.conn = conn

    def process_frame(self, frame: Payload) -> None:
        """Queue one frame for delivery."""
        self.process_frames((frame,))

    def bytes_received(self) -> None:
        """Part of a frame arrived: count it as activity for the heartbeat checks."""
        self.conn.last_activity = time.monotonic()

    def process_frames(self, frames: Any) -> None:
        """Deliver a batch of frames: right here for inline drivers, else via the ordered lane."""
        conn = self.conn
        conn.last_activity = time.monotonic()
        lane = conn.lane
        if lane is not None:
            lane.submit(frames, sum(map(len, frames)))
            return
        task = self.conn_manager.process_frame_task
        for frame in frames:
            if conn.closing:
                break
            task(conn, frame)


class ConnManager(ConnMonitor):
    """Maintains the SFM connections of one local endpoint and pumps messages through them."""

    def __init__(
        self,
        local_endpoint: Endpoint,
        *,
        registry: DriverRegistry | None = None,
        max_frame_size: int = fr.MAX_FRAME_SIZE,
        heartbeat_interval: float = 60.0,
        heartbeat_check: float | None = None,
        dead_after: int = 3,
        handshake_timeout: float = 10.0,
        reconnect_min: float = 0.5,
        reconnect_max: float = 30.0,
        delivery_workers: int = 4,
        queue_frames: int = 10_000,
        queue_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        validate_endpoint_name(local_endpoint.name)
        if max_frame_size < fr.PREFIX_LEN or max_frame_size > fr.MAX_FRAME_SIZE:
            raise CommError(CommError.BAD_CONFIG, f"max_frame_size must be 16..{fr.MAX_FRAME_SIZE}")
        self.local_endpoint = local_endpoint
        self.registry = registry or get_registry()
        self.max_frame_size = max_frame_size
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_check = heartbeat_check or min(5.0, heartbeat_interval / 2)
        self.dead_after = dead_after
        self.handshake_timeout = handshake_timeout
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.queue_frames = queue_frames
        self.queue_bytes = queue_bytes

        self.connectors: dict[str, ConnectorInfo] = {}
        self.sfm_conns: dict[str, SfmConnection] = {}
        self.sfm_endpoints: dict[str, SfmEndpoint] = {}
        self.receivers: dict[int, MessageReceiver] = {}
        self.monitors: list[EndpointMonitor] = []
        self.started = False
        self.stopped = False
        self.null_conn = NullConnection()

        self._lock = threading.RLock()
        self._ready = threading.Condition(self._lock)
        # Serialises monitor notifications, so a READY and a DISCONNECTED are never told in
        # the wrong order by two threads.
        self._notify_lock = threading.RLock()
        self._threads: dict[str, threading.Thread] = {}
        self._stop_event = threading.Event()
        self._dispatcher = Dispatcher(delivery_workers)
        self._loopback_lane = self._dispatcher.lane(self._run_task, max_items=queue_frames)
        self._heartbeat_thread: threading.Thread | None = None

    # -- connectors ----------------------------------------------------------------------

    def add_connector(self, driver: Driver | str, params: dict | None, mode: Mode) -> str:
        """Add a connector; ``driver`` may be a Driver, a URL (``tcp://0:8002``) or a scheme.

        Returns the connector's handle. If the manager is started, the connector starts now.
        """
        params = dict(params or {})
        mode = Mode(mode)
        if isinstance(driver, str):
            if "://" in driver or not _SCHEME.match(driver):
                params = {**parse_url(driver), **params}
                scheme = params["scheme"]
            else:
                scheme = driver.lower()
                params.setdefault("scheme", scheme)
            driver = self.registry.create_driver(scheme)
        elif not isinstance(driver, Driver):
            raise CommError(CommError.BAD_CONFIG, f"add_connector needs a Driver, URL or scheme, got {driver!r}")
        if "scheme" not in params:
            params["scheme"] = driver.supported_transports()[0]
        # After the URL's own query params, so that ?max_frame_size= in a URL still wins.
        params.setdefault("max_frame_size", self.max_frame_size)
        with self._lock:
            if self.stopped:
                raise CommError(CommError.CLOSED, "ConnManager is stopped")
            handle = get_handle()
            connector = ConnectorInfo(handle, driver, params, mode)
            driver.register_conn_monitor(self)
            self.connectors[handle] = connector
            if self.started:
                self.start_connector(connector)
        log.debug("%s: added connector %s", self.local_endpoint.name, connector)
        return handle

    def get_connector(self, handle: str) -> ConnectorInfo:
        """The connector for a handle; raises ``CommError(BAD_CONFIG)`` if unknown."""
        connector = self.connectors.get(handle)
        if connector is None:
            raise CommError(CommError.BAD_CONFIG, f"no connector with handle {handle!r}")
        return connector

    def wait_listening(self, handle: str, timeout: float | None = 10.0) -> str:
        """Block until a passive connector listens; return the URL peers can use."""
        return self.get_connector(handle).wait_listening(timeout)

    def remove_connector(self, handle: str) -> None:
        """Stop a connector, close its connections and join its thread."""
        with self._lock:
            connector = self.connectors.pop(handle, None)
            thread = self._threads.pop(handle, None)
        if connector is None:
            return
        self._stop_connector(connector, thread)

    def _stop_connector(self, connector: ConnectorInfo, thread: threading.Thread | None) -> None:
        connector.stopping = True
        try:
            connector.driver.shutdown()
        except Exception:
            log.exception("driver shutdown failed for %s", connector)
        if thread is not None and thread is not threading.current_thread():
            thread.join(10.0)
            if thread.is_alive():
                log.warning("connector thread %s did not stop", thread.name)

    def start_connector(self, connector: ConnectorInfo) -> None:
        """Start connector in a new thread."""
        if connector.started:
            return
        connector.started = True
        t = threading.Thread(
            target=self.start_connector_task,
            args=(connector, self._stop_event, self.reconnect_min, self.reconnect_max),
            name=f"sfm-{connector.mode.value}-{connector.handle}",
            daemon=True,
        )
        self._threads[connector.handle] = t
        t.start()

    @staticmethod
    def start_connector_task(
        connector: ConnectorInfo,
        stop_event: threading.Event | None = None,
        reconnect_min: float = 0.5,
        reconnect_max: float = 30.0,
    ) -> None:
        """Run a connector until it is stopped: listen once, or connect and reconnect with backoff."""
        stop_event = stop_event or threading.Event()
        if connector.mode == Mode.PASSIVE:
            try:
                connector.driver.listen(connector)
            except Exception as e:
                connector.failed(e)
                if not connector.stopping:
                    log.error("listener %s failed: %s", connector, e)
            return
        attempt = 0
        while not connector.stopping and not stop_event.is_set():
            before = connector.total_conns
            try:
                connector.driver.connect(connector)
            except Exception as e:
                connector.error = e
                if not connector.stopping:
                    log.info("connector %s: %s", connector, e)
            if connector.stopping:
                break
            attempt = 0 if connector.total_conns > before else attempt + 1
            delay = min(reconnect_max, reconnect_min * (2 ** min(attempt, 20)))
            delay *= random.uniform(0.5, 1.0)  # jitter keeps a crowd of clients from reconnecting in step
            if stop_event.wait(delay):
                break

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start delivery, heartbeats and every connector added so far."""
        with self._lock:
            if self.started:
                return
            if self.stopped:
                raise CommError(CommError.CLOSED, "ConnManager cannot be restarted after stop()")
            self.started = True
            self._dispatcher.start()
            self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, name="sfm-heartbeat", daemon=True)
            self._heartbeat_thread.start()
            for connector in self.connectors.values():
                self.start_connector(connector)

    def stop(self) -> None:
        """Close every connection and listener and join every thread this manager started."""
        with self._lock:
            if self.stopped:
                return
            self.stopped = True
            connectors = list(self.connectors.values())
            threads = dict(self._threads)
            self.connectors.clear()
            self._threads.clear()
        self._stop_event.set()
        for connector in connectors:
            self._stop_connector(connector, threads.get(connector.handle))
        for sfm_conn in list(self.sfm_conns.values()):
            try:
                sfm_conn.close()
            except Exception:
                log.exception("error closing %s", sfm_conn.name)
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(10.0)
        self._dispatcher.stop()

    # -- ConnMonitor: driver connection events ------------------------------------------

    def state_change(self, connection: Connection) -> None:
        """Driver state change notification, including new connections."""
        try:
            if connection.state == ConnState.CONNECTED:
                self.handle_new_connection(connection)
            elif connection.state == ConnState.CLOSED:
                self.close_connection(connection)
        finally:
            broadcast("sfm_connection_state_changed", manager=self, connection=connection)

    def handle_new_connection(self, connection: Connection) -> None:
        """Set up a new driver connection; the active side starts the handshake."""
        if self.stopped:
            connection.close()  # e.g. a connect that completed while stop() ran
            return
        mode = connection.connector.mode if connection.connector else Mode.PASSIVE
        sfm_conn = SfmConnection(connection, self.local_endpoint, mode, self.max_frame_size)
        pause = connection.pause_reading if connection.supports_pause else None
        resume = connection.resume_reading if connection.supports_pause else None
        if not connection.inline_delivery:
            sfm_conn.lane = self._dispatcher.lane(
                lambda frame: self.process_frame_task(sfm_conn, frame),
                max_items=self.queue_frames,
                max_bytes=self.queue_bytes,
                pause=pause,
                resume=resume,
            )
        with self._lock:
            self.sfm_conns[connection.name] = sfm_conn
        connection.register_frame_receiver(SfmFrameReceiver(self, sfm_conn))
        if mode == Mode.ACTIVE:
            try:
                sfm_conn.send_handshake(FrameType.HELLO, connection.offered_extensions())
            except CommError as e:
                log.warning("%s: could not send HELLO on %s: %s", self.local_endpoint.name, connection.name, e)
                connection.close()

    def close_connection(self, connection: Connection) -> None:
        """Forget a closed connection; its endpoint is DISCONNECTED when no connection is left."""
        with self._lock:
            sfm_conn = self.sfm_conns.pop(connection.name, None)
            if sfm_conn is None or sfm_conn.sfm_endpoint is None:
                return
            sfm_ep = sfm_conn.sfm_endpoint
            sfm_ep.connections = [c for c in sfm_ep.connections if c is not sfm_conn]
            if sfm_ep.connections or self.sfm_endpoints.get(sfm_ep.endpoint.name) is not sfm_ep:
                return  # other connections remain, or a newer one replaced this endpoint
            del self.sfm_endpoints[sfm_ep.endpoint.name]
            sfm_ep.endpoint.state = EndpointState.DISCONNECTED
        # Through the connection's lane (if any), so monitors hear of it after its messages.
        lane = sfm_conn.lane
        task = functools.partial(self._notify_disconnected, sfm_ep)
        if lane is None or not self.started or self.stopped or not lane.submit((task,)):
            task()

    def _notify_disconnected(self, sfm_ep: SfmEndpoint) -> None:
        with self._notify_lock:
            current = self.sfm_endpoints.get(sfm_ep.endpoint.name)
            if current is not None:
                # It came back meanwhile: a stale DISCONNECTED would contradict its READY. But
                # monitors still believe in this name, so the newcomer's loss is news to them.
                current.told_ready = current.told_ready or sfm_ep.told_ready
                return
            if not sfm_ep.told_ready:
                return  # lost before its READY was told: monitors never knew of it
            self.notify_monitors(sfm_ep.endpoint)

    # -- receiving -----------------------------------------------------------------------

    def process_frame(self, sfm_conn: SfmConnection, frame: Payload) -> None:
        """Queue a received frame for ordered delivery (what SfmFrameReceiver does)."""
        SfmFrameReceiver(self, sfm_conn).process_frame(frame)

    def process_frame_task(self, sfm_conn: SfmConnection, frame: Any) -> None:
        """Decode and act on one frame (runs on a delivery thread)."""
        if callable(frame):  # a notification queued behind the frames
            frame()
            return
        if isinstance(frame, list):
            frame = b"".join(frame)
        try:
            decoded = fr.decode_frame(frame, self.max_frame_size)
            ftype = decoded.type
            if ftype == FrameType.DATA:
                self._on_data(sfm_conn, decoded)
            elif ftype == FrameType.HELLO or ftype == FrameType.READY:
                self._on_handshake(sfm_conn, decoded)
            elif ftype == FrameType.PING:
                decode_ping_payload(decoded.payload)
                sfm_ep = sfm_conn.sfm_endpoint
                stream_id = sfm_ep.next_stream_id() if sfm_ep else 1
                sfm_conn.send_frame(FrameType.PONG, 0, stream_id, None, _PING_PAYLOAD)
            elif ftype == FrameType.PONG:
                decode_ping_payload(decoded.payload)
            else:
                log.warning(
                    "%s: ignoring frame of unknown type %d on %s", self.local_endpoint.name, ftype, sfm_conn.name
                )
        except CommError as e:
            if e.code == CommError.BAD_DATA:
                log.warning("%s: closing %s: %s", self.local_endpoint.name, sfm_conn.name, e.message)
                if sfm_conn.lane is not None:
                    sfm_conn.lane.close()
                sfm_conn.close()
            else:
                log.warning("%s: error on %s: %s", self.local_endpoint.name, sfm_conn.name, e)

    def _on_data(self, sfm_conn: SfmConnection, frame: fr.Frame) -> None:
        sfm_ep = sfm_conn.sfm_endpoint
        if sfm_ep is None:
            raise CommError(CommError.BAD_DATA, "DATA frame before the handshake")
        receiver = self.receivers.get(frame.app_id)
        if receiver is None:
            log.debug("%s: no receiver for app_id %d; message dropped", self.local_endpoint.name, frame.app_id)
            return
        try:
            receiver.process_message(
                sfm_ep.endpoint, sfm_conn.conn, frame.app_id, Message(frame.headers, frame.payload)
            )
        except Exception:  # the app's bug is the app's; the connection goes on
            log.exception("%s: receiver for app_id %d failed", self.local_endpoint.name, frame.app_id)

    def _on_handshake(self, sfm_conn: SfmConnection, frame: fr.Frame) -> None:
        if sfm_conn.sfm_endpoint is not None:
            raise CommError(CommError.BAD_DATA, f"second handshake frame ({FrameType(frame.type).name})")
        expected = FrameType.HELLO if sfm_conn.mode == Mode.PASSIVE else FrameType.READY
        if frame.type != expected:
            raise CommError(CommError.BAD_DATA, f"got {FrameType(frame.type).name} where {expected.name} was expected")
        hello = parse_handshake(frame.payload, self.local_endpoint.name)
        agreed = negotiate(sfm_conn.conn.offered_extensions(), hello.extensions)
        data = {"endpoint_name": hello.name, **hello.properties}
        if frame.type == FrameType.READY:
            sfm_conn.conn.extensions = agreed
            self.update_endpoint(sfm_conn, data)
            return
        # Record the endpoint before READY goes out, so a peer that has READY is known here
        # (and of two connections claiming one name, the one answered last is kept). The send
        # lock is held throughout: a message sent to the endpoint the moment it is known
        # still goes out after READY.
        with sfm_conn._send_lock:
            sfm_conn.conn.extensions = agreed
            registered = self._register_endpoint(sfm_conn, data)
            if registered is None:
                return
            try:
                # READY names only what the peer offered: a plain peer sees no sfm_ext at all.
                sfm_conn.send_handshake(FrameType.READY, agreed)
            except BaseException:
                sfm_ep, replaced, _changed = registered
                self._unregister_endpoint(sfm_conn, sfm_ep, replaced)
                raise
        self._settle_endpoint(sfm_conn, *registered)

    def _unregister_endpoint(self, sfm_conn: SfmConnection, sfm_ep: SfmEndpoint, replaced: list[SfmConnection]) -> None:
        """READY could not be sent on ``sfm_conn``: give the endpoint back the connections it
        replaced, which still work (a new endpoint goes when ``sfm_conn`` closes, untold)."""
        with self._lock:
            if replaced and sfm_ep.connections == [sfm_conn]:
                sfm_ep.connections = replaced
                sfm_conn.sfm_endpoint = None

    def update_endpoint(self, sfm_conn: SfmConnection, data: dict) -> None:
        """Record the peer named in a handshake map on this connection; the endpoint is READY.

        As in the original, a new handshake from an endpoint name replaces that endpoint's
        older connections (typically half-open ones of a client that reconnected): they are
        closed, and the endpoint stays READY throughout.
        """
        registered = self._register_endpoint(sfm_conn, data)
        if registered is not None:
            self._settle_endpoint(sfm_conn, *registered)

    def _register_endpoint(
        self, sfm_conn: SfmConnection, data: dict
    ) -> tuple[SfmEndpoint, list[SfmConnection], bool] | None:
        """Make ``sfm_conn`` the endpoint's connection; returns what ``_settle_endpoint`` needs."""
        name = data.get("endpoint_name")
        if not name:
            raise CommError(CommError.BAD_DATA, "handshake has no endpoint_name")
        properties = {k: v for k, v in data.items() if k != "endpoint_name"}
        conn_props = sfm_conn.conn.get_conn_properties()
        with self._lock:
            if sfm_conn.name not in self.sfm_conns:
                return None  # closed while the handshake was queued
            sfm_ep = self.sfm_endpoints.get(name)
            replaced: list[SfmConnection] = []
            new = sfm_ep is None
            if sfm_ep is None:
                sfm_ep = SfmEndpoint(Endpoint(name, properties, conn_props))
            else:
                replaced = sfm_ep.connections
                sfm_ep.endpoint.properties = properties
                sfm_ep.endpoint.conn_props = conn_props
            sfm_ep.connections = [sfm_conn]
            sfm_conn.sfm_endpoint = sfm_ep
            changed = sfm_ep.endpoint.state != EndpointState.READY
            sfm_ep.endpoint.state = EndpointState.READY
            if new:
                # Published only once usable: find_endpoint and send_message take no lock.
                self.sfm_endpoints[name] = sfm_ep
            self._ready.notify_all()
        return sfm_ep, replaced, changed

    def _settle_endpoint(
        self, sfm_conn: SfmConnection, sfm_ep: SfmEndpoint, replaced: list[SfmConnection], changed: bool
    ) -> None:
        """Close the connections ``sfm_conn`` replaced and tell monitors the endpoint is READY."""
        name = sfm_ep.endpoint.name
        now = time.monotonic()
        for old in replaced:
            if now - old.last_activity < self.heartbeat_check:
                # Not a stale half-open connection: two live ones claim the same name (two
                # connectors of one endpoint to us, or two processes with one name).
                log.warning(
                    "%s: a second live connection claims endpoint %r; closing the older %s, as NVFlare does "
                    "(one connection per endpoint: two connectors from one endpoint to one peer replace each other)",
                    self.local_endpoint.name,
                    name,
                    old.name,
                )
            else:
                log.info("%s: %s replaced by a newer connection from %s", self.local_endpoint.name, old.name, name)
            old.close()
        if changed:
            with self._notify_lock:
                if self.sfm_endpoints.get(name) is sfm_ep and sfm_ep.endpoint.state == EndpointState.READY:
                    sfm_ep.told_ready = True
                    self.notify_monitors(sfm_ep.endpoint)

    # -- sending -------------------------------------------------------------------------

    def send_message(self, endpoint: Endpoint, app_id: int, headers: dict | None, payload: Payload | None) -> None:
        """Send a message to ``endpoint`` for ``app_id``; no response is expected.

        Thread-safe. ``payload`` may be bytes, bytearray, memoryview or a list of them; it is
        sent as it is, never copied into a frame buffer. Raises ``CommError``.
        """
        sfm_ep = self.sfm_endpoints.get(endpoint.name)
        if sfm_ep is None or sfm_ep.endpoint.state != EndpointState.READY or not sfm_ep.connections:
            self._send_unusual(endpoint, app_id, headers, payload)
            return
        stream_id = next(sfm_ep._stream_ids) & 0xFFFF
        conns = sfm_ep.connections
        try:
            conns[stream_id % len(conns)].send_frame(FrameType.DATA, app_id, stream_id, headers, payload)
        except CommError as e:
            raise CommError(e.code, f"sending to endpoint {endpoint.name!r}: {e.message}") from e

    def _send_unusual(self, endpoint: Endpoint, app_id: int, headers: dict | None, payload: Payload | None) -> None:
        name = endpoint.name
        if name == self.local_endpoint.name:
            self.send_loopback_message(endpoint, app_id, headers, payload)
            return
        sfm_ep = self.sfm_endpoints.get(name)
        if sfm_ep is None or not sfm_ep.connections:
            raise CommError(CommError.CLOSED, f"no connection to endpoint {name!r}")
        if sfm_ep.endpoint.state != EndpointState.READY:
            raise CommError(CommError.NOT_READY, f"endpoint {name!r} is {sfm_ep.endpoint.state.name}, not READY")
        self.send_message(endpoint, app_id, headers, payload)  # became ready meanwhile

    def send_loopback_message(
        self, endpoint: Endpoint, app_id: int, headers: dict | None, payload: Payload | None
    ) -> None:
        """Send message to itself (delivered in order on a delivery thread)."""
        self._loopback_lane.submit((lambda: self.loopback_message_task(endpoint, app_id, headers, payload),))

    def loopback_message_task(
        self, endpoint: Endpoint, app_id: int, headers: dict | None, payload: Payload | None
    ) -> None:
        """Deliver a loopback message with the same payload type as a received one."""
        receiver = self.receivers.get(app_id)
        if receiver is None:
            log.debug("%s: no receiver for loopback app_id %d", self.local_endpoint.name, app_id)
            return
        if payload is not None and not isinstance(payload, (bytes, bytearray, memoryview)):
            payload = b"".join(payload)
        view = memoryview(payload) if payload is not None and len(payload) else None
        try:
            receiver.process_message(self.local_endpoint, self.null_conn, app_id, Message(headers or None, view))
        except Exception:
            log.exception("%s: loopback receiver for app_id %d failed", self.local_endpoint.name, app_id)

    @staticmethod
    def _run_task(task: Callable[[], None]) -> None:
        task()

    # -- endpoints and receivers ---------------------------------------------------------

    def register_message_receiver(self, app_id: int, receiver: MessageReceiver) -> None:
        """Deliver DATA for ``app_id`` to ``receiver``; one receiver per app_id."""
        if app_id in self.receivers:
            raise CommError(CommError.BAD_CONFIG, f"a receiver is already registered for app_id {app_id}")
        self.receivers[app_id] = receiver

    def add_endpoint_monitor(self, monitor: EndpointMonitor) -> None:
        """Tell ``monitor`` of endpoint state changes: READY, later DISCONNECTED, in that order.

        A peer whose connection is lost before its READY was told is not told at all.
        """
        self.monitors.append(monitor)

    def notify_monitors(self, endpoint: Endpoint) -> None:
        """Tell every endpoint monitor (and plugins) that ``endpoint`` changed state."""
        for monitor in list(self.monitors):
            try:
                monitor.state_change(endpoint)
            except Exception:
                log.exception("endpoint monitor %r failed", monitor)
        broadcast("sfm_endpoint_state_changed", manager=self, endpoint=endpoint)

    def find_endpoint(self, name: str) -> Endpoint | None:
        """The endpoint with this name: ourselves, a connected peer, or None."""
        if name == self.local_endpoint.name:
            return self.local_endpoint
        sfm_ep = self.sfm_endpoints.get(name)
        return sfm_ep.endpoint if sfm_ep else None

    def wait_for_endpoint(self, name: str, timeout: float | None = 10.0) -> Endpoint:
        """Block until endpoint ``name`` is READY and return it; ``CommError(TIMEOUT)`` if not."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._ready:
            while True:
                ep = self.find_endpoint(name)
                if ep is not None and ep.state == EndpointState.READY:
                    return ep
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise CommError(CommError.TIMEOUT, f"endpoint {name!r} not READY within {timeout} s")
                self._ready.wait(left)

    def get_connections(self, name: str) -> list[SfmConnection] | None:
        """The SFM connections to endpoint ``name``, or None if it is not connected."""
        sfm_ep = self.sfm_endpoints.get(name)
        return list(sfm_ep.connections) if sfm_ep else None

    def remove_endpoint(self, name: str) -> None:
        """Close every connection to ``name`` and forget it."""
        sfm_ep = self.sfm_endpoints.get(name)
        if sfm_ep is None:
            return
        for sfm_conn in list(sfm_ep.connections):
            sfm_conn.close()

    @staticmethod
    def get_dict_payload(prefix: Any, frame: Payload) -> dict:
        """Decode the msgpack map in a frame's payload (handshake); ``prefix`` has ``header_len``."""
        data = memoryview(frame if not isinstance(frame, list) else b"".join(frame))
        start = fr.PREFIX_LEN + int(prefix.header_len)
        value = msgpack.unpackb(data[start:])
        if not isinstance(value, dict):
            raise CommError(CommError.BAD_DATA, f"payload is not a map: {type(value).__name__}")
        return value

    # -- heartbeats and timeouts ---------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        while not self._stop_event.wait(self.heartbeat_check):
            self._check_connections(time.monotonic())

    def _check_connections(self, now: float) -> None:
        for sfm_conn in list(self.sfm_conns.values()):
            silent = now - sfm_conn.last_activity
            try:
                if sfm_conn.sfm_endpoint is None:
                    if now - sfm_conn.created > self.handshake_timeout:
                        log.warning(
                            "%s: closing %s: no handshake within %s s",
                            self.local_endpoint.name,
                            sfm_conn.name,
                            self.handshake_timeout,
                        )
                        sfm_conn.close()
                elif silent > self.dead_after * self.heartbeat_interval:
                    log.warning(
                        "%s: closing %s to %s: silent for %.1f s",
                        self.local_endpoint.name,
                        sfm_conn.name,
                        sfm_conn.sfm_endpoint.endpoint.name,
                        silent,
                    )
                    sfm_conn.close()
                elif silent >= self.heartbeat_interval and now - sfm_conn.last_ping >= self.heartbeat_interval:
                    # Never wait behind a sender blocked on a slow peer: this thread
                    # serves the timeouts of every connection.
                    if sfm_conn.send_ping():
                        sfm_conn.last_ping = now
            except CommError as e:
                log.info("%s: heartbeat on %s failed: %s", self.local_endpoint.name, sfm_conn.name, e)
            except Exception:
                log.exception("heartbeat check failed on %s", sfm_conn.name)
