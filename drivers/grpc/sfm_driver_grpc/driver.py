"""The gRPC driver: ``grpc://host:port`` and ``grpcs://`` (TLS), NVFlare's ``streamer.Streamer/Stream``, on grpc.aio.

Every server, channel and stream of every GrpcDriver runs on the one shared asyncio loop of
``sfm_core.aio``: a stream costs a few tasks, not a thread, so a listener has no fixed cap
on concurrent connections (NVFlare's sync server stops at its 100 pool threads). Why aio and
not the sync API: measured, see docs/drivers/grpc.md.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

import grpc
from sfm_core import CommError, ConnectorInfo, Mode
from sfm_core.aio import LoopThread
from sfm_core.aio_driver import AioDriver
from sfm_core.driver_params import ACTIVE, PASSIVE, Param, parse_params
from sfm_core.frames import MAX_FRAME_SIZE
from sfm_core.tls import TlsSettings
from sfm_core.url import bind_host, connect_address, host_port, listening_url

from . import wire
from .connection import BATCH_EXTENSION, GrpcConnection
from .tls import GrpcTls, explain_failure, secure_scheme

log = logging.getLogger(__name__)

SERVICE = "streamer.Streamer"
METHOD = "Stream"
METHOD_PATH = f"/{SERVICE}/{METHOD}"
DEFAULT_SEND_TIMEOUT = 60.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_SEND_QUEUE_BYTES = 16 * 1024 * 1024
#: A listener closes a connection that has not finished its setup (TCP accepted, TLS, the
#: client's HTTP/2 SETTINGS) within this many seconds (``grpc.server_handshake_timeout_ms``,
#: gRPC's own default is 120 s). On grpcs:// the default is ``tls_handshake_timeout``.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: A listener closes a connection with no stream open for this long (``grpc.max_connection_idle_ms``;
#: gRPC's default is never): a peer that connects and opens no stream is not kept forever.
DEFAULT_IDLE_TIMEOUT = 30.0
DRIVER_NAME = "grpc driver"
#: The most a batch may hold, whatever either side's max_frame_size: part of the
#: ``grpc-batch`` extension, so a receiver that offers it can size its limit for any sender.
BATCH_MAX = 256 * 1024
DEFAULT_BATCH_BYTES = BATCH_MAX
_GRPC_INT_MAX = 2**31 - 1

#: The most seconds gRPC takes in a millisecond option (a C int).
_GRPC_SECONDS_MAX = _GRPC_INT_MAX / 1000


def _options(max_frame_size: int, batch: bool) -> list[tuple[str, Any]]:
    # A message is one Frame: the SFM frame (or, with grpc-batch, a batch of up to BATCH_MAX)
    # plus at most ENVELOPE_MAX bytes of protobuf envelope. Both directions are set on both
    # sides (gRPC's default receive limit is 4 MiB).
    payload = max(max_frame_size, BATCH_MAX) if batch else max_frame_size
    limit = min(_GRPC_INT_MAX, payload + wire.ENVELOPE_MAX)
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        # Larger HTTP/2 DATA frames and read-ahead: measured +30 % at 1 MiB messages here
        # (docs/drivers/grpc.md); the defaults are 16 KiB frames.
        ("grpc.http2.max_frame_size", 16 * 1024 * 1024 - 1),
        ("grpc.http2.lookahead_bytes", 16 * 1024 * 1024),
    ]


#: Streams one client connection may have open at once on a listener (``max_streams``).
DEFAULT_MAX_STREAMS = 4

#: This driver's own connector parameters (``host``, ``port``, ``max_frame_size``, TLS and a
#: listener's limits are the core's: ``sfm_core.driver_params.CORE_PARAMS``).
PARAMS = (
    Param("send_timeout", float, DEFAULT_SEND_TIMEOUT, minimum=0.001, doc="seconds a send may make no progress"),
    Param(
        "connect_timeout",
        float,
        DEFAULT_CONNECT_TIMEOUT,
        minimum=0.001,
        modes=(ACTIVE,),
        doc="seconds until the channel is READY",
    ),
    Param("send_queue_bytes", int, DEFAULT_SEND_QUEUE_BYTES, minimum=0, doc="bytes queued before send_frame blocks"),
    Param("batch", bool, True, doc="offer the grpc-batch extension"),
    Param("batch_bytes", int, DEFAULT_BATCH_BYTES, minimum=0, maximum=BATCH_MAX, doc="most bytes in one batch"),
    Param(
        "handshake_timeout",
        float,
        None,  # tls_handshake_timeout on grpcs, DEFAULT_HANDSHAKE_TIMEOUT on grpc
        minimum=0.001,
        maximum=_GRPC_SECONDS_MAX,
        modes=(PASSIVE,),
        doc="seconds a connection may take to finish its setup",
    ),
    Param(
        "idle_timeout",
        float,
        DEFAULT_IDLE_TIMEOUT,
        minimum=0,
        maximum=_GRPC_SECONDS_MAX,
        modes=(PASSIVE,),
        doc="seconds a connection may have no stream open (0: never)",
    ),
    Param(
        "max_streams",
        int,
        DEFAULT_MAX_STREAMS,
        minimum=1,
        maximum=_GRPC_INT_MAX,
        modes=(PASSIVE,),
        doc="streams one client connection may have open at once",
    ),
    Param(
        "ssl_target_name_override",
        str,
        None,
        modes=(ACTIVE,),
        doc="grpcs: the name the server certificate must have instead of the host dialled",
    ),
)


def _parse(params: dict, mode: Mode) -> dict[str, Any]:
    return parse_params(PARAMS, params, mode, driver=DRIVER_NAME)


def _server_options(params: dict, tls: TlsSettings | None) -> list[tuple[str, Any]]:
    """Bounds on connections that never become a stream (hostile or broken peers), from a
    listener's parsed parameters."""
    handshake = params["handshake_timeout"]
    if handshake is None:
        handshake = tls.handshake_timeout if tls is not None else DEFAULT_HANDSHAKE_TIMEOUT
    options = [("grpc.server_handshake_timeout_ms", min(_GRPC_INT_MAX, max(1, int(handshake * 1000))))]
    # gRPC core counts HTTP/2 connections from accept(), before TLS: the listener's
    # max_connections holds for the sockets, and the core's slots (one per stream) inside them.
    options.append(("grpc.max_allowed_incoming_connections", params["max_connections"]))
    # An sfm connection is one stream (NVFlare's too). gRPC core buffers a whole message,
    # up to max_frame_size, before the driver sees it, and sets no stream limit of its own:
    # this bounds what one connection can make the listener hold before its handshake.
    options.append(("grpc.max_concurrent_streams", params["max_streams"]))
    if params["idle_timeout"] > 0:  # 0: never (gRPC's default)
        options.append(("grpc.max_connection_idle_ms", max(1, int(params["idle_timeout"] * 1000))))
    return options


def _grpc_style(target: str) -> str:
    """``host:port`` the way gRPC names a peer (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``)."""
    host = target.rsplit(":", 1)[0].strip("[]")
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return f"dns:{target}"
    return f"ipv{version}:{target}"


def _conn_kwargs(params: dict) -> dict:
    """The GrpcConnection keyword arguments of parsed parameters."""
    max_frame_size = params["max_frame_size"]
    return {
        "max_frame_size": max_frame_size,
        "send_timeout": params["send_timeout"],
        "send_queue_bytes": params["send_queue_bytes"],
        "batch": params["batch"],
        # A batch is one message: never more than the frame limit (a smaller max_frame_size
        # makes the default smaller; a batch_bytes given above it is refused by validate()).
        "batch_bytes": min(max_frame_size, params["batch_bytes"]),
    }


class GrpcDriver(AioDriver):
    """gRPC, plaintext (``grpc://``) or TLS (``grpcs://``, or ``secure=true``). Params
    (:data:`PARAMS`, :meth:`parameters`): ``send_timeout``, ``connect_timeout`` (active),
    ``send_queue_bytes``, ``batch`` (offer the ``grpc-batch`` extension, default on),
    ``batch_bytes``; listener: ``handshake_timeout``, ``idle_timeout``, ``max_streams``;
    connector: ``ssl_target_name_override``; and the core's: ``host``, ``port``,
    ``max_frame_size``, a listener's ``max_connections`` and ``max_handshakes``
    (:mod:`sfm_core.limits`), TLS (``sfm_core.tls``): ``ca_cert``, ``server_cert``,
    ``server_key``, ``client_cert``, ``client_key``, ``connection_security``,
    ``tls_handshake_timeout``.
    """

    #: The driver contract this driver is written for (docs/plugins.md).
    SFM_DRIVER_CONTRACT = 1
    DRIVER_NAME = DRIVER_NAME

    def __init__(self) -> None:
        super().__init__()
        #: TLS of each connector that uses it, by handle (reload_tls reloads them).
        self._tls: dict[str, GrpcTls] = {}
        #: The last connect failure reported at WARNING, by connector handle (not repeated each retry).
        self._last_failure: dict[str, str] = {}

    @staticmethod
    def supported_transports() -> list[str]:
        return ["grpc", "grpcs"]

    @staticmethod
    def capabilities() -> dict[str, Any]:
        return {
            "max_frame_size": MAX_FRAME_SIZE,
            "tls": True,
            "io": "grpc.aio on the shared sfm asyncio loop",
            "extensions": [BATCH_EXTENSION],
        }

    # -- checks and TLS --------------------------------------------------------------------------

    @classmethod
    def parameters(cls) -> tuple[Param, ...]:
        return PARAMS

    def validate(self, params: dict, mode: Mode) -> None:
        """Parse every parameter and read the TLS files now, so add_connector reports mistakes."""
        parsed = _parse(params, mode)
        if params.get("batch_bytes") is not None and parsed["batch_bytes"] > parsed["max_frame_size"]:
            raise CommError(
                CommError.BAD_CONFIG,
                f"{DRIVER_NAME}: parameter batch_bytes={params['batch_bytes']!r} is out of range; expected an int "
                f"<= max_frame_size ({parsed['max_frame_size']})",
            )
        tls = TlsSettings.from_params(params, server=mode == Mode.PASSIVE, driver=DRIVER_NAME)
        if mode != Mode.PASSIVE:
            connect_address(params, DRIVER_NAME)
        if tls is not None:
            GrpcTls(tls)  # the PEM bytes gRPC will get, read once

    def _tls_for(self, connector: ConnectorInfo) -> GrpcTls | None:
        """The connector's TLS (made on first use, kept for its reconnects), or None."""
        with self._lock:
            tls = self._tls.get(connector.handle)
        if tls is not None:
            return tls
        settings = TlsSettings.from_params(connector.params, server=connector.mode == Mode.PASSIVE, driver=DRIVER_NAME)
        if settings is None:
            return None
        tls = GrpcTls(settings)
        with self._lock:
            return self._tls.setdefault(connector.handle, tls)

    def reload_tls(self) -> None:
        """Read every connector's TLS files again: new connections (and reconnects) use them;
        live ones go on. A listener's server keeps running (dynamic credentials)."""
        with self._lock:
            tls = list(self._tls.values())
        for t in tls:
            t.reload()

    # -- passive -------------------------------------------------------------------------------

    def listen(self, connector: ConnectorInfo) -> None:
        params = _parse(connector.params, connector.mode)
        host = bind_host(params["host"])
        port = params["port"] or 0
        kwargs = _conn_kwargs(params)
        tls = self._tls_for(connector)
        options = _server_options(params, tls.settings if tls is not None else None)
        scheme = params["scheme"] or "grpc"
        if tls is not None:
            scheme = secure_scheme(scheme)  # also for secure=true on grpc://
        lt = self.acquire()
        try:
            server, actual = self.run(self._start_server(lt, connector, host, port, kwargs, tls, options), 30)
            try:
                connector.listening(listening_url(scheme, params["host"], actual))
                if tls is not None:
                    log.info(
                        "grpc: listening on %s with TLS (connection_security=%s)",
                        host_port(host or "*", actual),
                        tls.settings.security,
                    )
                else:
                    log.info("grpc: listening on %s", host_port(host or "*", actual))
                self.wait_stopping()
            finally:
                # stop(0) cancels every handler, so each connection's run() ends and is removed.
                lt.run(server.stop(0), timeout=30)
        finally:
            self.release()

    async def _start_server(
        self,
        lt: LoopThread,
        connector: ConnectorInfo,
        host: str,
        port: int,
        kwargs: dict,
        tls: GrpcTls | None,
        server_options: list[tuple[str, Any]],
    ) -> tuple[grpc.aio.Server, int]:
        # so_reuseport=0: gRPC sets SO_REUSEPORT by default, which would let a second listener
        # "bind" a port in use instead of failing.
        options = [*_options(kwargs["max_frame_size"], kwargs["batch"]), ("grpc.so_reuseport", 0), *server_options]
        server = grpc.aio.server(options=options)
        listen_host = host or "0.0.0.0"

        async def handle(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
            conn = GrpcConnection(
                connector,
                self,
                lt.loop,
                context,
                peer_addr=context.peer(),
                local_addr=host_port(listen_host, actual),
                is_server=True,
                transport="grpcs" if tls is not None else "grpc",
                tls_props=tls.server_properties(context) if tls is not None else None,
                **kwargs,
            )
            if not self.add_connection(conn):
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the sfm listener is full; try again later")
            await conn.run()

        handler = grpc.method_handlers_generic_handler(SERVICE, {METHOD: grpc.stream_stream_rpc_method_handler(handle)})
        server.add_generic_rpc_handlers((handler,))
        addr = host_port(listen_host, port)
        try:
            actual = server.add_secure_port(addr, tls.server_credentials()) if tls else server.add_insecure_port(addr)
            error = "" if actual else "no port"
        except RuntimeError as e:
            error = str(e)
        if error:
            await server.stop(0)
            # Not referenced from the exception's traceback: a live grpc.aio object keeps its
            # global poller thread and fds alive, and the core keeps the error.
            del server, handle
            raise CommError(CommError.ERROR, f"grpc: cannot listen on {addr}: {error}")
        await server.start()
        return server, actual

    # -- active --------------------------------------------------------------------------------

    def connect(self, connector: ConnectorInfo) -> None:
        params = _parse(connector.params, connector.mode)
        host, port = connect_address(connector.params, "grpc")
        timeout = params["connect_timeout"]
        kwargs = _conn_kwargs(params)
        tls = self._tls_for(connector)
        override = params["ssl_target_name_override"]
        target = host_port(host, port)
        lt = self.acquire()
        try:
            # Not cancelled by shutdown(): _open watches self.stopping and closes its channel
            # itself (cancelling could leak a channel on its way back).
            conn = self.run(self._open(lt, connector, target, timeout, kwargs, tls, override), timeout + 10)
            # On this (connector) thread, so the core's HELLO is queued before the stream runs.
            self.add_connection(conn)
            if self.stopping:  # shutdown() may have closed the others before this one was added
                conn.close()
            # Not cancellable by shutdown(): close() ends run(), which closes the channel.
            lt.submit(conn.run()).result()
        finally:
            self.release()

    async def _open(
        self,
        lt: LoopThread,
        connector: ConnectorInfo,
        target: str,
        timeout: float,
        kwargs: dict,
        tls: GrpcTls | None,
        override: str | None,
    ) -> GrpcConnection:
        # A local subchannel pool: each SFM connection gets its own TCP connection instead of
        # sharing one with every other channel to the same target in this process.
        options = [*_options(kwargs["max_frame_size"], kwargs["batch"]), ("grpc.use_local_subchannel_pool", 1)]
        if tls is not None:
            if override is not None:
                # The name the server's certificate must have instead of the dialled host.
                options.append(("grpc.ssl_target_name_override", override))
            channel = grpc.aio.secure_channel(target, tls.channel_credentials(), options=options)
        else:
            channel = grpc.aio.insecure_channel(target, options=options)
        # Polling get_state() instead of awaiting channel_ready(): a refused connection is
        # reported at once (TRANSIENT_FAILURE), and a cancelled channel_ready() leaves a cycle
        # that keeps grpc.aio's global poller thread alive until the garbage collector runs.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        error = ""
        ok = False
        try:
            while True:
                if self.stopping:
                    error = "the driver is shut down"
                    break
                state = channel.get_state(try_to_connect=True)
                if state == grpc.ChannelConnectivity.READY:
                    break
                if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN):
                    error = await self._failure(connector, channel, target, tls, override)
                    break
                if loop.time() > deadline:
                    error = f"not connected within {timeout} s"
                    break
                await asyncio.sleep(0.005)
            if not error and self.stopping:
                error = "the driver is shut down"
            ok = not error
        finally:
            if not ok:
                await channel.close()
        if error:
            del channel
            raise CommError(CommError.CLOSED, f"grpc: cannot connect to {target}: {error}")
        with self._lock:
            self._last_failure.pop(connector.handle, None)
        call = channel.stream_stream(METHOD_PATH)()
        return GrpcConnection(
            connector,
            self,
            lt.loop,
            call,
            peer_addr=_grpc_style(target),
            local_addr="",
            channel=channel,
            transport="grpcs" if tls is not None else "grpc",
            tls_props=tls.client_properties() if tls is not None else None,
            **kwargs,
        )

    async def _failure(
        self,
        connector: ConnectorInfo,
        channel: grpc.aio.Channel,
        target: str,
        tls: GrpcTls | None,
        override: str | None,
    ) -> str:
        """Why a channel in TRANSIENT_FAILURE did not connect, in words that say what to fix.

        gRPC tells it only in the status of a call: one made now fails at once (no
        wait_for_ready) with the channel's last connect error as its details. A TLS mismatch
        (plaintext to a TLS listener, TLS to a plaintext one, a refused certificate) is
        logged as a WARNING, once per connector until it changes or a connection succeeds.
        """
        call = channel.stream_stream(METHOD_PATH)()
        try:
            details = await asyncio.wait_for(call.details(), 5)
        except (TimeoutError, grpc.RpcError):
            details = ""
        finally:
            call.cancel()
            del call
        text, mismatch = explain_failure(details or "connection failed", tls, target, override)
        with self._lock:
            repeated = self._last_failure.get(connector.handle) == text
            if mismatch:
                self._last_failure[connector.handle] = text
        if mismatch and not repeated:
            log.warning(
                "grpc: connector %s (%s) cannot connect to %s: %s",
                connector.handle,
                connector.params.get("url") or connector.params.get("scheme"),
                target,
                text,
            )
        return text
