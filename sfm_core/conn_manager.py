"""ConnManager: the SFM connections of one local endpoint, and the messages through them.

The I/O shell over two pieces that hold the logic: each connection's protocol is a
sans-I/O :class:`~sfm_core.session.Session`, and the remote endpoints live in one
:class:`~sfm_core.endpoint_table.EndpointTable`. This module routes frames between drivers,
sessions and receivers, runs the heartbeat timer and tells monitors; see
``docs/architecture.md``.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Iterable
from typing import Any

import msgpack

from . import frames as fr
from .admission import Admission
from .connectors import ConnectorSet, check_params, get_handle, resolve_driver, run_connector
from .delivery import Dispatcher
from .driver import Connection, ConnectorInfo, ConnMonitor, ConnState, Driver, Mode
from .endpoint import Endpoint, EndpointMonitor
from .endpoint_table import EndpointTable, SfmEndpoint
from .errors import CommError, HandshakeRefused
from .frames import Frame, Payload
from .handshake import validate_endpoint_name
from .heartbeat import Heartbeat
from .loopback import LoopbackMessage, deliver_loopback
from .message import Message, MessageReceiver
from .plugins import ask_admission, broadcast, wrap_frame_receiver
from .registry import DriverRegistry, get_registry
from .session import (
    HelloReceived,
    Ignored,
    Liveness,
    ProtocolError,
    ReadyReceived,
    Refused,
    SendPong,
    Session,
    State,
)
from .sfm_connection import NullConnection, SfmConnection, SfmFrameReceiver, linger_on

__all__ = ["ConnManager", "NullConnection", "SfmConnection", "SfmEndpoint", "SfmFrameReceiver", "get_handle"]

log = logging.getLogger(__name__)

# Plain values for the receive loop (an enum attribute lookup per frame shows there).
_OPEN = State.OPEN
_DATA = int(fr.FrameType.DATA)
_PREFIX_LEN = fr.PREFIX_LEN
#: The prefix fields a DATA frame's delivery needs: length, header_len, type, app_id.
_DATA_FIELDS = struct.Struct(">IHB3xH4x")


class ConnManager(ConnMonitor):
    """Maintains the SFM connections of one local endpoint and pumps messages through them.

    Liveness: every connection sends PING every ``heartbeat_interval`` s whatever the
    traffic, and is closed as dead once nothing has arrived from the peer and none of our
    sends made progress for ``dead_after`` intervals. ``linger``: how long ``stop()`` and
    ``remove_endpoint()`` wait for messages already accepted to be sent.
    """

    def __init__(
        self,
        local_endpoint: Endpoint,
        *,
        registry: DriverRegistry | None = None,
        max_frame_size: int = fr.MAX_FRAME_SIZE,
        heartbeat_interval: float = 30.0,
        heartbeat_check: float | None = None,
        dead_after: int = 3,
        handshake_timeout: float = 10.0,
        linger: float = 5.0,
        reconnect_min: float = 0.5,
        reconnect_max: float = 30.0,
        delivery_workers: int = 4,
        queue_frames: int = 10_000,
        queue_bytes: int = 64 * 1024 * 1024,
        identity_map: dict[str, str] | None = None,
    ) -> None:
        validate_endpoint_name(local_endpoint.name)
        if max_frame_size < fr.PREFIX_LEN or max_frame_size > fr.MAX_FRAME_SIZE:
            raise CommError(CommError.BAD_CONFIG, f"max_frame_size must be 16..{fr.MAX_FRAME_SIZE}")
        if linger < 0:
            raise CommError(CommError.BAD_CONFIG, f"linger must be >= 0, got {linger}")
        if heartbeat_check is not None and heartbeat_check <= 0:
            raise CommError(CommError.BAD_CONFIG, f"heartbeat_check must be > 0, got {heartbeat_check}")
        self.local_endpoint = local_endpoint
        self.registry = registry or get_registry()
        self.max_frame_size = max_frame_size
        self.liveness = Liveness(heartbeat_interval, dead_after, handshake_timeout)
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_check = heartbeat_check or min(5.0, heartbeat_interval / 4)
        self.linger = linger
        self.queue_frames = queue_frames
        self.queue_bytes = queue_bytes

        self._connectors = ConnectorSet(reconnect_min, reconnect_max)
        #: The connectors by handle.
        self.connectors = self._connectors.by_handle
        self.sfm_conns: dict[str, SfmConnection] = {}
        self.endpoints = EndpointTable()
        self.receivers: dict[int, MessageReceiver] = {}
        self.monitors: list[EndpointMonitor] = []
        self.started = False
        self.stopped = False
        self.null_conn = NullConnection()

        self._lock = threading.RLock()
        #: The delivery threads run (from start() until the end of stop()).
        self._delivering = False
        self._dispatcher = Dispatcher(delivery_workers)
        self._loopback_lane = self._dispatcher.lane(self._deliver_loopback, max_items=queue_frames)
        self._admission = Admission(
            self.endpoints,
            local_endpoint.name,
            self.notify_monitors,
            self.heartbeat_check,
            identity_map,
            lambda conn, name, props: ask_admission(self, conn, name, props),
        )
        self._heartbeat = Heartbeat(
            local_endpoint.name,
            lambda: list(self.sfm_conns.values()),
            self.heartbeat_check,
            self._abandon_soon,
            self._dispatcher.run_soon,
        )

    @classmethod
    def from_config(
        cls,
        source: Any,
        *,
        environ: Any = None,
        registry: DriverRegistry | None = None,
    ) -> ConnManager:
        """The ConnManager a configuration describes (a TOML file's path, or a mapping in the
        same shape), with the environment's overrides (``environ``, default ``os.environ``)
        and every connector added; not started. Raises ``sfm_core.config.ConfigError``
        (``CommError(BAD_CONFIG)``) listing every mistake. See ``docs/configuration.md``."""
        from .config import manager_from_config

        return manager_from_config(source, environ=environ, registry=registry)

    # -- connectors ----------------------------------------------------------------------

    def add_connector(self, driver: Driver | str, params: dict | None, mode: Mode) -> str:
        """Add a connector; ``driver`` may be a Driver, a URL (``tcp://0:8002``) or a scheme.

        Returns the connector's handle. If the manager is started, the connector starts now.
        """
        mode = Mode(mode)
        driver, params = resolve_driver(driver, params, self.registry)
        # After the URL's own query params, so that ?max_frame_size= in a URL still wins.
        params.setdefault("max_frame_size", self.max_frame_size)
        check_params(driver, params, mode)
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
        return self._connectors.get(handle)

    def wait_listening(self, handle: str, timeout: float | None = 10.0) -> str:
        """Block until a passive connector listens; return the URL peers can use."""
        return self.get_connector(handle).wait_listening(timeout)

    def remove_connector(self, handle: str) -> None:
        """Stop a connector, close its connections and join its thread."""
        self._connectors.remove(handle)  # not under our lock: the driver's threads call us meanwhile

    def reload_tls(self) -> None:
        """Read every connector's TLS files again: new connections use them, live ones go on.

        Every connector is tried; then ``CommError(BAD_CONFIG)`` names each whose files are
        wrong (those keep their old settings)."""
        self._connectors.reload_tls()

    def start_connector(self, connector: ConnectorInfo) -> None:
        """Start connector in a new thread."""
        self._connectors.start(connector, self.start_connector_task)

    @staticmethod
    def start_connector_task(
        connector: ConnectorInfo,
        stop_event: threading.Event | None = None,
        reconnect_min: float = 0.5,
        reconnect_max: float = 30.0,
    ) -> None:
        """Run a connector until it is stopped: listen once, or connect and reconnect with backoff."""
        run_connector(connector, stop_event or threading.Event(), reconnect_min, reconnect_max)

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
            self._delivering = True
            self._heartbeat.start()
            for connector in self.connectors.values():
                self.start_connector(connector)

    def stop(self, linger: float | None = None) -> None:
        """Send what was accepted (up to ``linger`` s, default the manager's), then close every
        connection and listener and join every thread this manager started.

        Messages still unsent after the linger are dropped, counted and logged (WARNING).
        """
        with self._lock:
            if self.stopped:
                return
            self.stopped = True
        linger_on(list(self.sfm_conns.values()), self.linger if linger is None else linger, self.local_endpoint.name)
        self._connectors.stop_all()
        for sfm_conn in list(self.sfm_conns.values()):
            try:
                sfm_conn.close()
            except Exception:
                log.exception("error closing %s", sfm_conn.name)
        self._heartbeat.stop()
        self._dispatcher.stop()
        self._delivering = False

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
        ep = self.local_endpoint
        session = Session(
            ep.name,
            ep.properties,
            active=mode == Mode.ACTIVE,
            now=time.monotonic(),
            max_frame_size=self.max_frame_size,
            extensions=connection.offered_extensions(),
            liveness=self.liveness,
        )
        sfm_conn = SfmConnection(connection, session, mode)
        if not connection.inline_delivery:
            sfm_conn.lane = self._dispatcher.lane_for(
                connection,
                lambda frame: self.process_frame_task(sfm_conn, frame),
                self.queue_frames,
                self.queue_bytes,
                batch_handler=lambda frames: self.process_frames_task(sfm_conn, frames),
            )
        with self._lock:
            self.sfm_conns[connection.name] = sfm_conn
        connection.register_frame_receiver(wrap_frame_receiver(self, connection, SfmFrameReceiver(self, sfm_conn)))
        if mode == Mode.ACTIVE:
            try:
                sfm_conn.send(session.initiate(time.time()))
            except CommError as e:
                log.warning("%s: could not send HELLO on %s: %s", ep.name, connection.name, e)
                connection.close()

    def close_connection(self, connection: Connection) -> None:
        """Forget a closed connection; its endpoint is DISCONNECTED when no connection is left."""
        with self._lock:
            sfm_conn = self.sfm_conns.pop(connection.name, None)
        if sfm_conn is None:
            return
        sfm_conn.writer.close()  # its queued frames can go nowhere now
        sfm_ep = self.endpoints.forget(sfm_conn)
        # The session and monitors hear of the loss after the frames received before it.
        lane = sfm_conn.lane
        if lane is None or not self._delivering or not lane.finish(lambda: self._gone(sfm_conn, sfm_ep)):
            self._gone(sfm_conn, sfm_ep)

    def _abandon(self, sfm_conn: SfmConnection) -> None:
        """Close a connection the core gave up on (a dead peer, bad data) and forget it now,
        without waiting for the driver's graceful close to report it gone."""
        sfm_conn.close()
        self.close_connection(sfm_conn.conn)

    def _close_now(self, sfm_conn: SfmConnection) -> None:
        """Abandon a connection from its own delivery: frames still queued are dropped."""
        owed = sfm_conn.lane.close() if sfm_conn.lane is not None else None
        self._abandon(sfm_conn)
        if owed is not None:
            owed()  # the loss was reported before this frame: its notice is still owed

    def _abandon_soon(self, sfm_conn: SfmConnection) -> None:
        # From the heartbeat thread: monitors are told on a delivery thread, so a monitor that
        # blocks (or calls stop()) holds no session's timers.
        if self._delivering:
            self._dispatcher.run_soon(lambda: self._abandon(sfm_conn))
        else:
            self._abandon(sfm_conn)

    def _gone(self, sfm_conn: SfmConnection, sfm_ep: SfmEndpoint | None) -> None:
        sfm_conn.session.connection_lost()
        if sfm_ep is not None:
            self.endpoints.gone(sfm_ep)
            self.endpoints.tell(self.notify_monitors)

    # -- receiving -----------------------------------------------------------------------

    def process_frame(self, sfm_conn: SfmConnection, frame: Payload) -> None:
        """Queue a received frame for ordered delivery (what SfmFrameReceiver does)."""
        SfmFrameReceiver(self, sfm_conn).process_frame(frame)

    def process_frame_task(self, sfm_conn: SfmConnection, frame: Any) -> None:
        """Run one received frame through the connection's session and act on what it means."""
        if isinstance(frame, list):
            frame = b"".join(frame)
        event = sfm_conn.session.receive(frame)
        if type(event) is Frame:
            sfm_ep = sfm_conn.sfm_endpoint
            receiver = self.receivers.get(event.app_id)
            if receiver is None or sfm_ep is None:
                log.debug("%s: no receiver for app_id %d; dropped", self.local_endpoint.name, event.app_id)
                return
            try:
                receiver.process_message(
                    sfm_ep.endpoint, sfm_conn.conn, event.app_id, Message(event.headers, event.payload)
                )
            except Exception:  # the app's bug is the app's; the connection goes on
                log.exception("%s: receiver for app_id %d failed", self.local_endpoint.name, event.app_id)
        elif event is not None:
            try:
                self._on_event(sfm_conn, event)
            except CommError as e:
                log.warning("%s: closing %s: %s", self.local_endpoint.name, sfm_conn.name, e)
                sfm_conn.close()

    def process_frames_task(self, sfm_conn: SfmConnection, frames: Iterable[Any], inline: bool = False) -> None:
        """Run a batch of one connection's received frames, in order, as
        :meth:`process_frame_task` would one by one.

        The hot case, a well-formed DATA frame on an OPEN session, is decoded and delivered
        right here in one loop: no call per frame but the receiver's, attribute lookups
        hoisted out of the loop. Every other frame (control frames, any state but OPEN,
        anything that fails a check, a frame given as a list) goes through
        :meth:`process_frame_task`, which refuses it exactly as before. ``inline`` (the
        driver's own thread): stop once the connection is closing. Exceptions a frame's
        handling raises propagate, as from :meth:`process_frame_task`.
        """
        slow = self.process_frame_task
        if type(self).process_frame_task is not ConnManager.process_frame_task:
            # A subclass handles frames its own way: give it every frame.
            for frame in frames:
                if inline and sfm_conn.closing:
                    break
                slow(sfm_conn, frame)
            return
        session = sfm_conn.session
        conn = sfm_conn.conn
        receivers = self.receivers
        unpack = _DATA_FIELDS.unpack_from
        unpackb = msgpack.unpackb
        new = object.__new__
        max_size = session.max_frame_size
        # The receiver and endpoint of the last frame: a batch is mostly one app_id.
        last_app = -1
        deliver = None
        last_ep: SfmEndpoint | None = None
        endpoint = None
        for frame in frames:
            if inline and sfm_conn.closing:
                break
            kind = type(frame)
            if kind is bytes or kind is bytearray:
                size = len(frame)
            elif kind is memoryview and frame.format == "B" and frame.ndim == 1 and frame.c_contiguous:
                size = frame.nbytes
            else:
                size = -1  # a list of buffers, an mmap, an odd view: the general path
            # The state is checked per frame: another thread may close the session mid-batch.
            if size >= _PREFIX_LEN and session.state is _OPEN:
                length, header_len, ftype, app_id = unpack(frame)
                if ftype != _DATA or length != size or length > max_size or header_len > length - _PREFIX_LEN:
                    size = -1  # a control frame, or a refusal: the general path names the reason
            else:
                size = -1
            if size < 0:
                slow(sfm_conn, frame)
                last_app = -1  # a handshake or an event may have changed what was hoisted
                continue
            body = _PREFIX_LEN + header_len
            if header_len:
                try:
                    headers = unpackb(frame[_PREFIX_LEN:body])
                except Exception:
                    headers = None
                if type(headers) is not dict:
                    slow(sfm_conn, frame)  # refused there, naming what is wrong
                    last_app = -1
                    continue
            else:
                headers = None
            if app_id != last_app:
                last_app = app_id
                receiver = receivers.get(app_id)
                deliver = receiver.process_message if receiver is not None else None
            sfm_ep = sfm_conn.sfm_endpoint
            if deliver is None or sfm_ep is None:
                log.debug("%s: no receiver for app_id %d; dropped", self.local_endpoint.name, app_id)
                continue
            if sfm_ep is not last_ep:
                last_ep = sfm_ep
                endpoint = sfm_ep.endpoint
            # Message without the call to its __init__ (which only sets these two slots):
            # about 0.1 µs a message.
            message = new(Message)
            message.headers = headers
            if size > body:
                message.payload = (memoryview(frame) if kind is not memoryview else frame)[body:]
            else:
                message.payload = None
            try:
                deliver(endpoint, conn, app_id, message)
            except Exception:  # the app's bug is the app's; the connection goes on
                log.exception("%s: receiver for app_id %d failed", self.local_endpoint.name, app_id)

    def _on_event(self, sfm_conn: SfmConnection, event: Any) -> None:
        kind = type(event)
        if kind is SendPong:
            sfm_conn.send_control(event.frame)
        elif kind is HelloReceived:
            self._admission.accept(sfm_conn, event.peer)
        elif kind is ReadyReceived:
            sfm_conn.conn.extensions = sfm_conn.session.driver_extensions
            self._admission.register(sfm_conn, event.peer)
        elif kind is ProtocolError:
            log.warning("%s: closing %s: %s", self.local_endpoint.name, sfm_conn.name, event.reason)
            if event.frame is not None:
                sfm_conn.refuse(event.frame)
            self._close_now(sfm_conn)
        elif kind is Refused:
            peer_addr = sfm_conn.conn.get_conn_properties().get("peer_addr")
            log.warning("%s: %s (at %s)", self.local_endpoint.name, event.reason, peer_addr)
            connector = sfm_conn.conn.connector
            if connector is not None:  # what `sfm ping` and other callers can show
                connector.error = HandshakeRefused(event.reason)
            self._close_now(sfm_conn)
        elif kind is Ignored:
            level = logging.DEBUG if event.quiet else logging.WARNING
            log.log(level, "%s: %s on %s", self.local_endpoint.name, event.reason, sfm_conn.name)

    def update_endpoint(self, sfm_conn: SfmConnection, data: dict) -> None:
        """Record the peer named in a handshake map on this connection; the endpoint is READY.

        As in the original, a new handshake from an endpoint name replaces that endpoint's
        older connections (typically half-open ones of a client that reconnected): they are
        closed, and the endpoint stays READY throughout. Raises ``CommError``: ``BAD_DATA``
        naming what is wrong with ``data``, ``CLOSED`` if the connection is closing or closed.
        """
        self._admission.update(sfm_conn, data)

    # -- sending -------------------------------------------------------------------------

    def send_message(self, endpoint: Endpoint, app_id: int, headers: dict | None, payload: Payload | None) -> None:
        """Send a message to ``endpoint`` for ``app_id``; no response is expected.

        Thread-safe. ``payload`` may be bytes, bytearray, memoryview or a list of them; it is
        sent as it is, never copied into a frame buffer. When it returns, the frame has been
        handed to the driver: at most once, and not yet at the peer (``docs/architecture.md``).
        Raises ``CommError``.
        """
        sfm_ep = self.endpoints.by_name.get(endpoint.name)
        conns = sfm_ep.connections if sfm_ep is not None else None  # one read: forget() replaces it
        if not conns:
            if endpoint.name == self.local_endpoint.name:
                self.send_loopback_message(endpoint, app_id, headers, payload)
                return
            raise CommError(CommError.CLOSED, f"no connection to endpoint {endpoint.name!r}")
        stream_id = next(sfm_ep.stream_ids) & 0xFFFF
        try:
            conns[stream_id % len(conns)].send_data(app_id, stream_id, headers, payload)
        except CommError as e:
            raise CommError(e.code, f"sending to endpoint {endpoint.name!r}: {e.message}") from e
        except IndexError:  # its last connection went meanwhile
            raise CommError(CommError.CLOSED, f"no connection to endpoint {endpoint.name!r}") from None

    def send_messages(
        self, endpoint: Endpoint, app_id: int, messages: list[tuple[dict | None, Payload | None]]
    ) -> None:
        """Send several messages to ``endpoint`` for ``app_id``, in order, as ``send_message``
        would one by one, but cheaper: one lock, one loop packing their heads, and on the TCP
        driver one ``sendmsg`` (1,024 buffers at a time), the payloads never copied.

        ``messages`` is a list of ``(headers, payload)`` pairs. All of them go over one
        connection (so they arrive in this order). Every frame is checked first: one over the
        frame limit raises ``CommError(BAD_DATA)`` and nothing is sent. Thread-safe; raises
        ``CommError`` (``CLOSED`` if the endpoint has no connection, even for an empty list).
        A transport failure half-way may leave the first messages sent.
        """
        sfm_ep = self.endpoints.by_name.get(endpoint.name)
        conns = sfm_ep.connections if sfm_ep is not None else None  # one read: forget() replaces it
        if not messages and (conns or endpoint.name == self.local_endpoint.name):
            return
        if not conns:
            if endpoint.name == self.local_endpoint.name:
                self._loopback_lane.submit(
                    tuple(LoopbackMessage(endpoint, app_id, headers, payload) for headers, payload in messages)
                )
                return
            raise CommError(CommError.CLOSED, f"no connection to endpoint {endpoint.name!r}")
        ids = sfm_ep.stream_ids
        stream_ids = [next(ids) & 0xFFFF for _ in messages]  # one each, as send_message takes
        try:
            conns[stream_ids[0] % len(conns)].send_batch(app_id, stream_ids, messages)
        except CommError as e:
            raise CommError(e.code, f"sending to endpoint {endpoint.name!r}: {e.message}") from e
        except IndexError:  # its last connection went meanwhile
            raise CommError(CommError.CLOSED, f"no connection to endpoint {endpoint.name!r}") from None

    def send_loopback_message(
        self, endpoint: Endpoint, app_id: int, headers: dict | None, payload: Payload | None
    ) -> None:
        """Send message to itself (delivered in order on a delivery thread)."""
        self._loopback_lane.submit((LoopbackMessage(endpoint, app_id, headers, payload),))

    def _deliver_loopback(self, item: LoopbackMessage) -> None:
        self.loopback_message_task(item.endpoint, item.app_id, item.headers, item.payload)

    def loopback_message_task(
        self, endpoint: Endpoint, app_id: int, headers: dict | None, payload: Payload | None
    ) -> None:
        """Deliver a loopback message with the same payload type as a received one."""
        deliver_loopback(self.receivers, self.local_endpoint, self.null_conn, app_id, headers, payload)

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
        sfm_ep = self.endpoints.get(name)
        return sfm_ep.endpoint if sfm_ep else None

    def wait_for_endpoint(self, name: str, timeout: float | None = 10.0) -> Endpoint:
        """Block until endpoint ``name`` is READY and return it; ``CommError(TIMEOUT)`` if not."""
        if name == self.local_endpoint.name:
            return self.local_endpoint
        return self.endpoints.wait_ready(name, timeout)

    def get_connections(self, name: str) -> list[SfmConnection] | None:
        """The SFM connections to endpoint ``name``, or None if it is not connected."""
        sfm_ep = self.endpoints.get(name)
        return list(sfm_ep.connections) if sfm_ep else None

    def remove_endpoint(self, name: str) -> None:
        """Close every connection to ``name`` (after up to ``linger`` s for what was accepted)."""
        sfm_ep = self.endpoints.get(name)
        if sfm_ep is None:
            return
        conns = list(sfm_ep.connections)
        linger_on(conns, self.linger, self.local_endpoint.name)
        for sfm_conn in conns:
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
