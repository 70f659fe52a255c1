"""The WebSocket driver: ``ws://host:port`` and ``http://host:port`` (NVFlare's http scheme), and
their TLS forms ``wss://`` and ``https://`` (or ``secure=true``).

Passive: an HTTP/1.1 server on the shared asyncio loop that upgrades ``GET /f3`` to a WebSocket
(other paths: 404; a plain request: 426/400). Active: connects to ``ws://host:port/f3``
(``wss://`` with TLS). Every connection of every connector is a plain ``asyncio.Protocol`` on
the one loop of ``sfm_core.aio``; see ``connection.py``, and ``tls.py`` for the TLS listener.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from typing import Any

from websockets.client import ClientProtocol
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from sfm_core import CommError, ConnectorInfo, Mode
from sfm_core.aio_driver import AioDriver
from sfm_core.driver_params import ACTIVE, PASSIVE, Param, parse_params
from sfm_core.frames import MAX_FRAME_SIZE
from sfm_core.tls import TlsSettings
from sfm_core.url import bind_host, connect_address, format_url, host_port, listening_url

from .connection import WebSocketConnection
from .tls import TlsServer, describe_tls_error, secure_scheme

log = logging.getLogger(__name__)

DEFAULT_PATH = "/f3"
DEFAULT_BACKLOG = 65535  # the kernel caps it at net.core.somaxconn
DEFAULT_SEND_TIMEOUT = 60.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_OPEN_TIMEOUT = 10.0
DEFAULT_CLOSE_TIMEOUT = 2.0
DEFAULT_HIGH_WATER = 4 * 1024 * 1024


#: What create_connection raises when TCP connected and the TLS handshake failed.
_TLS_STAGE_ERRORS = (ssl.SSLError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError)
DRIVER_NAME = "websocket driver"

#: This driver's own connector parameters (``host``, ``port``, ``max_frame_size``, TLS and a
#: listener's limits are the core's: ``sfm_core.driver_params.CORE_PARAMS``).
PARAMS = (
    Param("path", str, DEFAULT_PATH, doc="the HTTP path of the upgrade"),
    Param("backlog", int, DEFAULT_BACKLOG, minimum=1, modes=(PASSIVE,), doc="listen backlog (capped by somaxconn)"),
    Param("send_timeout", float, DEFAULT_SEND_TIMEOUT, minimum=0.001, doc="seconds a send may make no progress"),
    Param(
        "connect_timeout",
        float,
        DEFAULT_CONNECT_TIMEOUT,
        minimum=0.001,
        modes=(ACTIVE,),
        doc="seconds for the TCP connect, TLS and the upgrade together",
    ),
    Param("open_timeout", float, DEFAULT_OPEN_TIMEOUT, minimum=0.001, doc="seconds the HTTP upgrade may take"),
    Param("close_timeout", float, DEFAULT_CLOSE_TIMEOUT, minimum=0, doc="seconds to wait for the peer's close"),
    Param("high_water", int, DEFAULT_HIGH_WATER, minimum=0, doc="bytes queued before send_frame blocks"),
)
#: The keyword arguments of a WebSocketConnection, taken from the parsed parameters.
_OPTIONS = ("path", "max_frame_size", "send_timeout", "open_timeout", "close_timeout", "high_water")


class WebSocketDriver(AioDriver):
    """WebSocket (RFC 6455), one SFM frame per binary message, no compression.

    Params (URL query or dict; :data:`PARAMS`, :meth:`parameters`): ``path`` (default ``/f3``),
    ``backlog``, ``send_timeout``, ``connect_timeout``, ``open_timeout`` (HTTP upgrade),
    ``close_timeout``, ``high_water`` (bytes queued per connection before ``send_frame``
    blocks); and the core's: ``host``, ``port``, ``max_frame_size`` (the largest message
    accepted; set on both sides), the TLS parameters of :class:`sfm_core.tls.TlsSettings`
    (``ca_cert``, ``server_cert``, ``server_key``, ``client_cert``, ``client_key``,
    ``connection_security``, ``check_hostname``, ``tls_handshake_timeout``, ``secure``), and a
    listener's ``max_connections`` and ``max_handshakes`` (:mod:`sfm_core.limits`), counted
    from ``accept()``.
    """

    #: The driver contract this driver is written for (docs/plugins.md).
    SFM_DRIVER_CONTRACT = 1
    DRIVER_NAME = DRIVER_NAME

    def __init__(self) -> None:
        super().__init__()
        # self._live (AioDriver): every transport this driver has open, handshaking or not.
        self._servers: list[_PlainServer | TlsServer] = []
        #: connect() calls still opening (TCP connect or upgrade); loop thread only.
        self._opening: set[asyncio.Task] = set()
        #: TLS settings of each connector that uses TLS, by handle (reload_tls reloads them).
        self._tls: dict[str, TlsSettings] = {}

    @staticmethod
    def supported_transports() -> list[str]:
        return ["ws", "http", "wss", "https"]

    @staticmethod
    def capabilities() -> dict[str, Any]:
        return {
            "max_frame_size": MAX_FRAME_SIZE,
            "tls": True,
            "io": "websockets sans-I/O protocol on the shared asyncio loop (sfm_core.aio)",
            "path": DEFAULT_PATH,
        }

    # -- checks and TLS ------------------------------------------------------------------

    @classmethod
    def parameters(cls) -> tuple[Param, ...]:
        return PARAMS

    def validate(self, params: dict, mode: Mode) -> None:
        """Parse every parameter (and read the TLS files) now, so add_connector reports mistakes."""
        parse_params(PARAMS, params, mode, driver=DRIVER_NAME)
        if mode != Mode.PASSIVE:
            connect_address(params, "websocket")
        TlsSettings.from_params(params, server=mode == Mode.PASSIVE, driver=DRIVER_NAME)

    def _tls_for(self, connector: ConnectorInfo) -> TlsSettings | None:
        """The connector's TLS settings (made on first use, kept for its reconnects), or None."""
        with self._lock:
            settings = self._tls.get(connector.handle)
        if settings is not None:
            return settings
        settings = TlsSettings.from_params(connector.params, server=connector.mode == Mode.PASSIVE, driver=DRIVER_NAME)
        if settings is not None:
            with self._lock:
                settings = self._tls.setdefault(connector.handle, settings)
        return settings

    def reload_tls(self) -> None:
        """Read every connector's TLS files again: new connections (and reconnects) use them."""
        with self._lock:
            settings = list(self._tls.values())
        for s in settings:
            s.reload()

    # -- passive -------------------------------------------------------------------------

    def listen(self, connector: ConnectorInfo) -> None:
        params = parse_params(PARAMS, connector.params, connector.mode, driver=DRIVER_NAME)
        host = bind_host(params["host"])
        port = params["port"] or 0
        backlog = params["backlog"]
        opts = {k: params[k] for k in _OPTIONS}
        tls = self._tls_for(connector)
        scheme = params["scheme"] or "ws"
        if tls is not None:
            scheme = secure_scheme(scheme)  # also for secure=true on ws:// or http://
        lt = self.acquire()
        loop = lt.loop
        try:

            def factory() -> WebSocketConnection:
                # max_size set explicitly: the library default (1 MiB) would cut big frames.
                proto = ServerProtocol(max_size=opts["max_frame_size"])
                return WebSocketConnection(self, connector, loop, proto, tls=tls, **opts)

            try:
                if tls is None:
                    server: Any = lt.run(_PlainServer.start(loop, factory, host or None, port, backlog), 30.0)
                else:
                    server = TlsServer(loop, tls, factory, scheme, opts["close_timeout"], connector.admit)
                    lt.run(server.start(host or None, port, backlog), 30.0)
            except OSError as e:
                raise CommError(
                    CommError.ERROR, f"websocket: cannot listen on {host_port(host or '*', port)}: {e}"
                ) from None
            with self._lock:
                self._servers.append(server)
            try:
                actual = server.sockets[0].getsockname()
                connector.listening(listening_url(scheme, params["host"], actual[1]))
                log.info(
                    "websocket: listening on %s%s%s",
                    host_port(actual),
                    opts["path"],
                    "" if tls is None else f" (TLS, connection_security={tls.security})",
                )
                self.wait_stopping()
            finally:
                lt.run(self._close_server(server, connector), 30.0)
        finally:
            self.release()

    def _server_opened(self, conn: WebSocketConnection) -> None:
        """A server-side connection finished its upgrade (loop thread)."""
        if self.stopping:
            conn.abort()
            return
        self.add_connection(conn)
        conn.added = True

    async def _close_server(self, server: Any, connector: ConnectorInfo) -> None:
        if isinstance(server, TlsServer):
            await server.aclose()
        else:
            server.close()
        conns = [c for c in self._live if c.connector is connector]
        for conn in conns:
            conn._close_on_loop()
        await _wait_lost(conns, DEFAULT_CLOSE_TIMEOUT + 1.0)
        with self._lock:
            if server in self._servers:
                self._servers.remove(server)

    # -- active --------------------------------------------------------------------------

    def connect(self, connector: ConnectorInfo) -> None:
        params = parse_params(PARAMS, connector.params, connector.mode, driver=DRIVER_NAME)
        host, port = connect_address(connector.params, "websocket")
        timeout = params["connect_timeout"]
        opts = {k: params[k] for k in _OPTIONS}
        self.check_running()
        tls = self._tls_for(connector)
        lt = self.acquire()
        try:
            # _open keeps one deadline of connect_timeout for TCP connect, TLS and upgrade
            # together; the margin here only covers its cleanup.
            conn = self.run(
                self._open(connector, host, port, timeout, opts, tls),
                timeout + 5.0,
                timeout_message=f"websocket: no connection to {host_port(host, port)} after {timeout} s",
            )
            try:
                self.check_running()
                self.add_connection(conn)
                conn.added = True
                lt.call_soon(conn.start_reading)
                # Block for the life of the connection, as the contract says.
                while not conn.wait_closed(1.0):
                    if self.stopping:
                        conn.close()
            finally:
                if not conn.closed:
                    conn.close()
                    if not conn.wait_closed(DEFAULT_CLOSE_TIMEOUT + 1.0):
                        lt.call_soon(conn.abort)
                        conn.wait_closed(2.0)
                self.remove_connection(conn)
        finally:
            self.release()

    async def _open(
        self, connector: ConnectorInfo, host: str, port: int, timeout: float, opts: dict, tls: TlsSettings | None
    ):
        loop = asyncio.get_running_loop()
        target = format_url("ws" if tls is None else "wss", host, port, opts["path"])
        uri = parse_uri(target)
        proto = ClientProtocol(uri, max_size=opts["max_frame_size"])
        conn = WebSocketConnection(self, connector, loop, proto, tls=tls, **opts)
        tls_args: dict = {}
        if tls is not None:
            # server_hostname is sent as SNI; the context checks it against the certificate
            # only with check_hostname=true (off by default, as NVFlare's http driver).
            tls_args = {
                "ssl": tls.client_context(),
                "server_hostname": host,
                "ssl_handshake_timeout": tls.handshake_timeout,
                "ssl_shutdown_timeout": opts["close_timeout"],
            }
        conn.opened = loop.create_future()
        # When the connect is cancelled (shutdown) before the upgrade is answered, nobody awaits
        # opened: take its exception, or asyncio prints "exception was never retrieved" at exit.
        conn.opened.add_done_callback(_consume_exception)
        task = asyncio.current_task()
        assert task is not None
        self.check_running()  # shutdown() may have run before this task could be cancelled by it
        self._opening.add(task)
        try:
            # One deadline for the TCP connect and the upgrade together.
            async with asyncio.timeout(timeout):
                try:
                    await loop.create_connection(lambda: conn, host, port, **tls_args)
                except OSError as e:
                    # TLS failures (an ssl error, a reset or the handshake timeout after TCP connected)
                    # in words; TCP's own errors (refused, unreachable) as they are.
                    if tls is None or conn.transport is not None or not isinstance(e, _TLS_STAGE_ERRORS):
                        raise
                    raise CommError(
                        CommError.CLOSED,
                        f"websocket: TLS handshake with {target} failed: "
                        f"{describe_tls_error(e, str(connector.params.get('scheme') or 'wss'))}",
                    ) from None
                return await conn.opened
        except (OSError, TimeoutError, CommError) as e:
            conn.abort()
            if conn.transport is not None:
                await _wait_lost([conn], 2.0)
            if isinstance(e, CommError):
                raise
            if isinstance(e, TimeoutError):
                raise CommError(
                    CommError.TIMEOUT, f"websocket: cannot connect to {target}: no connection within {timeout} s"
                ) from None
            raise CommError(CommError.CLOSED, f"websocket: cannot connect to {target}: {e}") from None
        except BaseException:
            conn.abort()
            raise
        finally:
            self._opening.discard(task)

    # -- shutdown ------------------------------------------------------------------------

    def shutdown_on_loop(self) -> None:
        """Cancel the connect() calls still in TCP connect or upgrade; close every transport."""
        for task in list(self._opening):
            task.cancel()
        super().shutdown_on_loop()


class _PlainServer:
    """A plain listener on every address of a host, all on one port.

    ``loop.create_server(host=None, port=0)`` binds 0.0.0.0 and :: to two *different* ports,
    and a listener reports one URL: here the first socket picks the port and every other
    family binds that same port (as :meth:`TlsServer.start` does), so the reported port
    works on every address. ``sockets`` and ``close()`` are those of ``asyncio.Server``.
    """

    #: Attempts with a new port when port 0 was asked and another family's port was taken.
    PORT_ATTEMPTS = 10

    def __init__(self, servers: list[asyncio.AbstractServer]) -> None:
        self.servers = servers

    @property
    def sockets(self) -> list:
        return [s for server in self.servers for s in server.sockets]

    def close(self) -> None:
        for server in self.servers:
            server.close()

    @classmethod
    async def start(
        cls, loop: asyncio.AbstractEventLoop, factory: Any, host: str | None, port: int, backlog: int
    ) -> _PlainServer:
        """Bind and listen on every address of ``host`` (all interfaces for None); raises ``OSError``."""
        infos = await loop.getaddrinfo(
            host, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        unique, seen = [], set()
        for family, type_, proto, _, addr in infos:
            if (family, addr) not in seen:
                seen.add((family, addr))
                unique.append((family, type_, proto, addr))
        if not unique:
            raise OSError(f"getaddrinfo({host!r}) returned no address")
        for attempt in range(cls.PORT_ATTEMPTS):
            try:
                socks = _bind_all(unique, port, backlog)
                break
            except OSError as e:
                # With port 0, the port the first family got may be taken on another family:
                # try again with a new one. An explicit port fails at once.
                if port != 0 or e.errno != errno.EADDRINUSE or attempt == cls.PORT_ATTEMPTS - 1:
                    raise
        servers: list[asyncio.AbstractServer] = []
        try:
            for sock in socks:
                servers.append(await loop.create_server(factory, sock=sock, backlog=backlog))
        except BaseException:
            for server in servers:
                server.close()
            for sock in socks[len(servers) :]:
                sock.close()
            raise
        return cls(servers)


def _bind_all(addrs: list[tuple], port: int, backlog: int) -> list[socket.socket]:
    """One listening socket per ``(family, type, proto, addr)``, every one on the same port."""
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, addr in addrs:
            try:
                sock = socket.socket(family, type_, proto)
            except OSError as e:  # as create_server: skip a family this host cannot open (no IPv6)
                log.debug("websocket: no %s socket: %s", family, e)
                continue
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                # As create_server does: :: must not also take IPv4, which has its own socket.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(socks) > 1:  # one port for every family
                addr = (addr[0], socks[0].getsockname()[1], *addr[2:])
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    if not socks:
        raise OSError(f"no socket could be opened for {[a[3] for a in addrs]}")
    return socks


async def _wait_lost(conns: list[WebSocketConnection], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while any(not c.closed for c in conns):
        if loop.time() >= deadline:
            for c in conns:
                if not c.closed:
                    c.abort()
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            return
        await asyncio.sleep(0.01)


def _consume_exception(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()
