"""The TCP driver: ``tcp://host:port``, frames back to back on a byte stream; ``stcp://`` (or
``secure=true``) runs them over TLS (``tls.py``)."""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import ssl
import threading
import time
from typing import Any

from sfm_core import CommError, ConnectorInfo, Driver, Mode
from sfm_core.driver_params import ACTIVE, PASSIVE, Param, parse_params
from sfm_core.frames import MAX_FRAME_SIZE
from sfm_core.limits import Slot
from sfm_core.tls import TlsSettings
from sfm_core.url import bind_host, connect_host, host_port, listening_url

from .connection import TcpConnection
from .reactor import DEFAULT_GATHER, Reactor
from .tls import HandshakeFailed, HandshakeTimer, TlsTcpConnection

log = logging.getLogger(__name__)

DEFAULT_BACKLOG = 65535  # the kernel caps it at net.core.somaxconn
DEFAULT_SEND_TIMEOUT = 60.0
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Pool threads of a listener: this many slow receivers can block at once before the
#: listener's other connections wait for a free thread.
DEFAULT_IO_THREADS = 4
_ACCEPTS_PER_EVENT = 256
# accept() errors that mean "out of resources": retrying at once would spin.
_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


DRIVER_NAME = "tcp"

#: This driver's own connector parameters (the core's, from ``host`` to the TLS files, are
#: ``sfm_core.driver_params.CORE_PARAMS``); :meth:`TcpDriver.parameters`.
PARAMS = (
    Param("backlog", int, DEFAULT_BACKLOG, minimum=1, modes=(PASSIVE,), doc="listen backlog (capped by somaxconn)"),
    Param("send_timeout", float, DEFAULT_SEND_TIMEOUT, minimum=0.001, doc="seconds a send may make no progress"),
    Param("connect_timeout", float, DEFAULT_CONNECT_TIMEOUT, minimum=0.001, modes=(ACTIVE,), doc="seconds to connect"),
    Param("io_threads", int, DEFAULT_IO_THREADS, minimum=1, modes=(PASSIVE,), doc="epoll pool threads of a listener"),
    Param("gather_us", float, DEFAULT_GATHER * 1e6, minimum=0, doc="us a pool thread waits on a dry stream (0: off)"),
)


def parse(params: dict, mode: Mode) -> dict[str, Any]:
    """Every parameter of a connector, typed, defaults filled; ``CommError(BAD_CONFIG)`` listing
    every mistake."""
    return parse_params(PARAMS, params, mode, driver=DRIVER_NAME)


class _Listener:
    """The listening socket as a reactor handler: accepts in batches."""

    def __init__(
        self,
        sock: socket.socket,
        driver: TcpDriver,
        connector: ConnectorInfo,
        reactor: Reactor,
        params: dict[str, Any],
        tls: TlsSettings | None,
    ) -> None:
        self.sock = sock
        self.driver = driver
        self.connector = connector
        self.reactor = reactor
        self.params = params
        self.tls = tls
        self._last_warning = 0.0

    def fileno(self) -> int:
        return self.sock.fileno()

    def readable_now(self) -> bool:
        return False  # accept batches are already bounded; let any pool thread take the next

    def wants_gather(self) -> bool:
        return False

    def on_readable(self) -> None:
        for _ in range(_ACCEPTS_PER_EVENT):
            try:
                sock, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                now = time.monotonic()
                if now - self._last_warning > 10:
                    self._last_warning = now
                    log.warning("tcp listener %s: accept failed: %s", self.connector.url, e)
                if e.errno in _RESOURCE_ERRORS:
                    time.sleep(0.1)  # the connection stays queued; this pool thread backs off
                return
            slot = self.connector.admit(host_port(addr))
            if slot is None:
                sock.close()  # the listener is full; the limit logs why
                continue
            self.driver._serve(sock, self.connector, self.reactor, self.params, self.tls, slot)

    def on_reactor_stop(self) -> None:
        self.sock.close()


class TcpDriver(Driver):
    """TCP, and TCP over TLS. Params (:data:`PARAMS`, :meth:`parameters`): ``backlog``,
    ``send_timeout``, ``connect_timeout`` (active), ``io_threads`` (listener pool size),
    ``gather_us`` (how long a pool thread waits for more data on a streaming connection before
    handing it back to epoll; 0 turns it off); and the core's (``host``, ``port``,
    ``max_frame_size``; for ``stcp://`` or ``secure=true`` the TLS params of
    :class:`sfm_core.tls.TlsSettings`; a listener's ``max_connections`` and ``max_handshakes``,
    :mod:`sfm_core.limits`, counted from ``accept()``).
    """

    #: The driver contract this driver is written for (docs/plugins.md).
    SFM_DRIVER_CONTRACT = 1

    def __init__(self) -> None:
        super().__init__()
        self._reactors: list[Reactor] = []
        self._lock = threading.Lock()
        self._stopping = False
        self._tls: dict[str, TlsSettings] = {}  # by connector handle: reload_tls() reloads them
        self._timer: HandshakeTimer | None = None

    @staticmethod
    def supported_transports() -> list[str]:
        return ["tcp", "stcp"]

    @staticmethod
    def capabilities() -> dict[str, Any]:
        return {"max_frame_size": MAX_FRAME_SIZE, "tls": True, "io": "epoll, leader/followers pool"}

    @classmethod
    def parameters(cls) -> tuple[Param, ...]:
        return PARAMS

    def validate(self, params: dict, mode: Mode) -> None:
        """Check the params (and the TLS files) before the connector starts."""
        parse(params, mode)
        TlsSettings.from_params(params, server=Mode(mode) == Mode.PASSIVE, driver=DRIVER_NAME)

    def reload_tls(self) -> None:
        """Read every connector's TLS files again: new connections use them, live ones go on.
        A connector whose new files are wrong keeps its old ones; the first error is raised."""
        with self._lock:
            settings = list(self._tls.values())
        errors = []
        for tls in settings:
            try:
                tls.reload()
            except CommError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def _tls_for(self, connector: ConnectorInfo) -> TlsSettings | None:
        """The connector's TLS settings (None for plain TCP), built once and kept for reloads."""
        with self._lock:
            tls = self._tls.get(connector.handle)
        if tls is not None:
            return tls
        tls = TlsSettings.from_params(connector.params, server=connector.mode == Mode.PASSIVE, driver=DRIVER_NAME)
        if tls is not None:
            with self._lock:
                tls = self._tls.setdefault(connector.handle, tls)
        return tls

    def _handshake_timer(self) -> HandshakeTimer:
        with self._lock:
            if self._timer is None:
                self._timer = HandshakeTimer(f"sfm-tcp-tls-{id(self) % 10000}")
            return self._timer

    def _new_reactor(self, threads: int = 1, gather: float = DEFAULT_GATHER) -> Reactor:
        reactor = Reactor(f"sfm-tcp-{id(self) % 10000}", oneshot=threads > 1, gather=gather)
        with self._lock:
            if self._stopping:
                reactor.close()
                raise CommError(CommError.CLOSED, "tcp driver was shut down; use a new driver instance")
            self._reactors.append(reactor)
        return reactor

    def _forget_reactor(self, reactor: Reactor) -> None:
        with self._lock:
            if reactor in self._reactors:
                self._reactors.remove(reactor)
        reactor.close()

    def _serve(
        self,
        sock: socket.socket,
        connector: ConnectorInfo,
        reactor: Reactor,
        params: dict[str, Any],
        tls: TlsSettings | None = None,
        slot: Slot | None = None,
    ) -> None:
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                timer = self._handshake_timer()
                conn: TcpConnection = TlsTcpConnection(
                    sock,
                    connector,
                    reactor,
                    self,
                    max_frame_size=params["max_frame_size"],
                    send_timeout=params["send_timeout"],
                    tls=tls,
                    timer=timer,
                )
            else:
                conn = TcpConnection(
                    sock,
                    connector,
                    reactor,
                    self,
                    max_frame_size=params["max_frame_size"],
                    send_timeout=params["send_timeout"],
                )
        except (OSError, ssl.SSLError) as e:  # the peer may already be gone
            log.info("tcp: dropping a new connection: %s", e)
            sock.close()
            if slot is not None:
                slot.release()
            return
        conn.slot = slot
        if tls is not None:
            # The TLS handshake runs on the pool's threads as its bytes arrive; the core
            # gets the connection (add_connection) once it is complete.
            timer.add(conn, tls.handshake_timeout)
            try:
                reactor.add(conn)
            except BaseException:
                timer.discard(conn)
                sock.close()
                if slot is not None:
                    slot.release()
                raise
            return
        conn.watch_for_tls()
        # The core registers its frame receiver in add_connection: only then may a pool
        # thread start reading.
        self.add_connection(conn)
        reactor.add(conn)

    def listen(self, connector: ConnectorInfo) -> None:
        params = parse(connector.params, connector.mode)
        tls = self._tls_for(connector)
        host = bind_host(params["host"])
        port = params["port"] or 0
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(params["backlog"])
            sock.setblocking(False)
            reactor = self._new_reactor(params["io_threads"], params["gather_us"] / 1e6)
        except OSError as e:
            sock.close()
            raise CommError(CommError.ERROR, f"tcp: cannot listen on {host_port(host or '*', port)}: {e}") from None
        except BaseException:
            sock.close()
            raise
        try:
            reactor.add(_Listener(sock, self, connector, reactor, params, tls))
        except BaseException:
            sock.close()
            self._forget_reactor(reactor)
            raise
        try:
            actual = sock.getsockname()
            scheme = "stcp" if tls is not None else params["scheme"] or "tcp"
            connector.listening(listening_url(scheme, params["host"], actual[1]))
            if tls is not None:
                log.info("tcp: listening on %s (TLS, connection_security=%s)", host_port(actual), tls.security)
            else:
                log.info("tcp: listening on %s", host_port(actual))
            reactor.serve(threads=params["io_threads"])
        finally:
            self._forget_reactor(reactor)

    def connect(self, connector: ConnectorInfo) -> None:
        params = parse(connector.params, connector.mode)
        if params["port"] is None:
            raise CommError(CommError.BAD_CONFIG, f"tcp: no port to connect to in {connector.params.get('url')}")
        tls = self._tls_for(connector)
        host = connect_host(params["host"])
        sock = self._open(host, params["port"], params["connect_timeout"])
        try:
            reactor = self._new_reactor()
        except BaseException:
            sock.close()
            raise
        try:
            if tls is None:
                self._serve(sock, connector, reactor, params)
            else:
                self._serve_tls_client(sock, connector, reactor, params, tls, host)
            reactor.serve(stop_when_empty=True)
        finally:
            self._forget_reactor(reactor)

    def _serve_tls_client(
        self,
        sock: socket.socket,
        connector: ConnectorInfo,
        reactor: Reactor,
        params: dict[str, Any],
        tls: TlsSettings,
        host: str,
    ) -> None:
        """The TLS handshake of an active connection, on the connector's own thread (up to
        ``tls_handshake_timeout``); then the connection goes to the core and the reactor."""
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = TlsTcpConnection(
                sock,
                connector,
                reactor,
                self,
                max_frame_size=params["max_frame_size"],
                send_timeout=params["send_timeout"],
                tls=tls,
                server_hostname=host,
            )
            conn.handshake_blocking(lambda: self._stopping)
        except HandshakeFailed as e:
            sock.close()
            log.warning("tcp: TLS to %s:%s failed: %s", host, params["port"], e)
            raise CommError(CommError.CLOSED, f"tcp: TLS to {host_port(host, params['port'])}: {e}") from None
        except (OSError, ssl.SSLError) as e:
            sock.close()
            raise CommError(CommError.CLOSED, f"tcp: TLS to {host_port(host, params['port'])}: {e}") from None
        except BaseException:
            sock.close()
            raise
        self.add_connection(conn)
        reactor.add(conn)

    def _open(self, host: str, port: int, timeout: float) -> socket.socket:
        """Connect without blocking shutdown(): poll in short steps, watching for a stop."""
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        except OSError as e:
            raise CommError(CommError.CLOSED, f"tcp: cannot resolve {host}: {e}") from None
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            err = sock.connect_ex(addr)
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            deadline = time.monotonic() + timeout
            while not poller.poll(100):
                if self._stopping:
                    raise CommError(CommError.CLOSED, "tcp driver shut down while connecting")
                if time.monotonic() > deadline:
                    raise OSError(errno.ETIMEDOUT, f"no answer within {timeout} s")
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
        except OSError as e:
            sock.close()
            reason = e.strerror or str(e)
            raise CommError(CommError.CLOSED, f"tcp: cannot connect to {host_port(host, port)}: {reason}") from None
        except BaseException:
            sock.close()
            raise
        return sock

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            reactors = list(self._reactors)
        for reactor in reactors:
            reactor.stop()
        super().shutdown()
        if self._timer is not None:
            self._timer.stop()
