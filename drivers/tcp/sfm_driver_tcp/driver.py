"""The TCP driver: ``tcp://host:port``, frames back to back on a byte stream."""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from sfm_core import CommError, ConnectorInfo, Driver
from sfm_core.frames import MAX_FRAME_SIZE
from sfm_core.url import bind_host, connect_host, format_url

from .connection import TcpConnection, _fmt
from .reactor import Reactor

log = logging.getLogger(__name__)

DEFAULT_BACKLOG = 65535  # the kernel caps it at net.core.somaxconn
DEFAULT_SEND_TIMEOUT = 60.0
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Pool threads of a listener: this many slow receivers can block at once before the
#: listener's other connections wait for a free thread.
DEFAULT_IO_THREADS = 4
_ACCEPTS_PER_EVENT = 256


def _param(params: dict, key: str, kind: type, default: Any) -> Any:
    value = params.get(key, default)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise CommError(
            CommError.BAD_CONFIG, f"tcp driver: parameter {key}={value!r} is not a {kind.__name__}"
        ) from None


class _Listener:
    """The listening socket as a reactor handler: accepts in batches."""

    def __init__(self, sock: socket.socket, driver: TcpDriver, connector: ConnectorInfo, reactor: Reactor) -> None:
        self.sock = sock
        self.driver = driver
        self.connector = connector
        self.reactor = reactor

    def fileno(self) -> int:
        return self.sock.fileno()

    def on_readable(self) -> None:
        for _ in range(_ACCEPTS_PER_EVENT):
            try:
                sock, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. EMFILE: log and let the other connections go on
                log.warning("tcp listener %s: accept failed: %s", self.connector.url, e)
                return
            self.driver._serve(sock, self.connector, self.reactor)

    def on_reactor_stop(self) -> None:
        self.sock.close()


class TcpDriver(Driver):
    """Plain TCP. Params: ``host``, ``port``, ``backlog``, ``send_timeout``, ``connect_timeout``,
    ``io_threads`` (listener pool size), ``max_frame_size``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._reactors: list[Reactor] = []
        self._lock = threading.Lock()
        self._stopping = False

    @staticmethod
    def supported_transports() -> list[str]:
        return ["tcp"]

    @staticmethod
    def capabilities() -> dict[str, Any]:
        return {"max_frame_size": MAX_FRAME_SIZE, "tls": False, "io": "epoll, leader/followers pool"}

    def _new_reactor(self) -> Reactor:
        reactor = Reactor(f"sfm-tcp-{id(self) % 10000}")
        with self._lock:
            if self._stopping:
                reactor.stop()
            self._reactors.append(reactor)
        return reactor

    def _forget_reactor(self, reactor: Reactor) -> None:
        with self._lock:
            if reactor in self._reactors:
                self._reactors.remove(reactor)

    def _serve(self, sock: socket.socket, connector: ConnectorInfo, reactor: Reactor) -> TcpConnection:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        params = connector.params
        conn = TcpConnection(
            sock,
            connector,
            reactor,
            self,
            max_frame_size=_param(params, "max_frame_size", int, MAX_FRAME_SIZE),
            send_timeout=_param(params, "send_timeout", float, DEFAULT_SEND_TIMEOUT),
        )
        # The core registers its frame receiver in add_connection: only then may a pool
        # thread start reading.
        self.add_connection(conn)
        reactor.add(conn)
        return conn

    def listen(self, connector: ConnectorInfo) -> None:
        params = connector.params
        host = bind_host(params.get("host"))
        port = _param(params, "port", int, 0)
        backlog = _param(params, "backlog", int, DEFAULT_BACKLOG)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise CommError(CommError.ERROR, f"tcp: cannot listen on {host or '*'}:{port}: {e}") from None
        threads = _param(params, "io_threads", int, DEFAULT_IO_THREADS)
        reactor = self._new_reactor()
        try:
            actual = sock.getsockname()
            url_host = params.get("host") if host else "127.0.0.1"
            if url_host in (None, "0", "0.0.0.0"):
                url_host = "127.0.0.1"
            connector.listening(format_url(params.get("scheme", "tcp"), url_host, actual[1]))
            log.info("tcp: listening on %s", _fmt(actual))
            reactor.add(_Listener(sock, self, connector, reactor))
            reactor.serve(threads=max(1, threads))
        finally:
            self._forget_reactor(reactor)

    def connect(self, connector: ConnectorInfo) -> None:
        params = connector.params
        host = connect_host(params.get("host"))
        if "port" not in params:
            raise CommError(CommError.BAD_CONFIG, f"tcp: no port to connect to in {params.get('url') or params}")
        port = _param(params, "port", int, 0)
        timeout = _param(params, "connect_timeout", float, DEFAULT_CONNECT_TIMEOUT)
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise CommError(CommError.CLOSED, f"tcp: cannot connect to {host}:{port}: {e}") from None
        reactor = self._new_reactor()
        try:
            self._serve(sock, connector, reactor)
            reactor.serve(stop_when_empty=True)
        finally:
            self._forget_reactor(reactor)

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            reactors = list(self._reactors)
        for reactor in reactors:
            reactor.stop()
        super().shutdown()
