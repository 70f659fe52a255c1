"""The gRPC driver: ``grpc://host:port``, NVFlare's ``streamer.Streamer/Stream``, on ``grpc.aio``.

Every server, channel and stream of every GrpcDriver runs on the one shared asyncio loop of
``sfm_core.aio``: a stream costs a few tasks, not a thread, so a listener has no fixed cap
on concurrent connections (NVFlare's sync server stops at its 100 pool threads). Why aio and
not the sync API: measured, see docs/drivers/grpc.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import ipaddress
import logging
import threading
from typing import Any

import grpc
import sfm_core
from sfm_core import CommError, ConnectorInfo, Driver
from sfm_core.aio import LoopThread, acquire_loop, release_loop
from sfm_core.frames import MAX_FRAME_SIZE
from sfm_core.params import get_param
from sfm_core.url import bind_host, connect_address, listening_url

from . import wire
from .connection import BATCH_EXTENSION, GrpcConnection

log = logging.getLogger(__name__)

SERVICE = "streamer.Streamer"
METHOD = "Stream"
METHOD_PATH = f"/{SERVICE}/{METHOD}"
DEFAULT_SEND_TIMEOUT = 60.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_SEND_QUEUE_BYTES = 16 * 1024 * 1024
#: The most a batch may hold, whatever either side's max_frame_size: part of the
#: ``grpc-batch`` extension, so a receiver that offers it can size its limit for any sender.
BATCH_MAX = 256 * 1024
DEFAULT_BATCH_BYTES = BATCH_MAX
_GRPC_INT_MAX = 2**31 - 1


_param = functools.partial(get_param, driver="grpc driver")


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


def _grpc_style(target: str) -> str:
    """``host:port`` the way gRPC names a peer (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``)."""
    host = target.rsplit(":", 1)[0].strip("[]")
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return f"dns:{target}"
    return f"ipv{version}:{target}"


def _conn_kwargs(params: dict) -> dict:
    max_frame_size = _param(params, "max_frame_size", int, MAX_FRAME_SIZE)
    if not 16 <= max_frame_size <= MAX_FRAME_SIZE:
        raise CommError(CommError.BAD_CONFIG, f"grpc driver: max_frame_size must be 16..{MAX_FRAME_SIZE}")
    return {
        "max_frame_size": max_frame_size,
        "send_timeout": _param(params, "send_timeout", float, DEFAULT_SEND_TIMEOUT),
        "send_queue_bytes": _param(params, "send_queue_bytes", int, DEFAULT_SEND_QUEUE_BYTES),
        "batch": _param(params, "batch", bool, True),
        "batch_bytes": min(max_frame_size, BATCH_MAX, _param(params, "batch_bytes", int, DEFAULT_BATCH_BYTES)),
    }


class GrpcDriver(Driver):
    """gRPC over an insecure channel. Params: ``host``, ``port``, ``max_frame_size``,
    ``send_timeout``, ``connect_timeout``, ``send_queue_bytes``, ``batch`` (offer the
    ``grpc-batch`` extension, default on), ``batch_bytes``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._stopping = False
        self._stop_listen = threading.Event()

    @staticmethod
    def supported_transports() -> list[str]:
        return ["grpc"]

    @staticmethod
    def capabilities() -> dict[str, Any]:
        return {
            "max_frame_size": MAX_FRAME_SIZE,
            "tls": False,
            "io": "grpc.aio on the shared sfm asyncio loop",
            "extensions": [BATCH_EXTENSION],
        }

    # -- helpers -------------------------------------------------------------------------------

    def _submit(self, lt: LoopThread, coro: Any) -> concurrent.futures.Future:
        """Run ``coro`` on the loop, unless the driver is shut down."""
        with self._lock:
            if self._stopping:
                coro.close()
                raise CommError(CommError.CLOSED, "grpc driver is shut down")
            return lt.submit(coro)

    @staticmethod
    def _wait(fut: concurrent.futures.Future, timeout: float | None = None) -> Any:
        try:
            return fut.result(timeout)
        except concurrent.futures.CancelledError:
            raise CommError(CommError.CLOSED, "grpc driver is shut down") from None
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise CommError(CommError.TIMEOUT, f"grpc driver: no result within {timeout} s") from None

    # -- passive -------------------------------------------------------------------------------

    def listen(self, connector: ConnectorInfo) -> None:
        params = connector.params
        host = bind_host(params.get("host"))
        port = _param(params, "port", int, 0)
        kwargs = _conn_kwargs(params)
        lt = acquire_loop()
        try:
            server, actual = self._wait(self._submit(lt, self._start_server(lt, connector, host, port, kwargs)), 30)
            try:
                connector.listening(listening_url(params.get("scheme", "grpc"), params.get("host"), actual))
                log.info("grpc: listening on %s:%d", host or "*", actual)
                self._stop_listen.wait()
            finally:
                # stop(0) cancels every handler, so each connection's run() ends and is removed.
                lt.run(server.stop(0), timeout=30)
        finally:
            release_loop()

    async def _start_server(
        self, lt: LoopThread, connector: ConnectorInfo, host: str, port: int, kwargs: dict
    ) -> tuple[grpc.aio.Server, int]:
        # so_reuseport=0: gRPC sets SO_REUSEPORT by default, which would let a second listener
        # "bind" a port in use instead of failing.
        options = [*_options(kwargs["max_frame_size"], kwargs["batch"]), ("grpc.so_reuseport", 0)]
        server = grpc.aio.server(options=options)
        listen_host = host or "0.0.0.0"

        async def handle(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
            conn = GrpcConnection(
                connector,
                self,
                lt.loop,
                context,
                peer_addr=context.peer(),
                local_addr=f"{listen_host}:{actual}",
                is_server=True,
                **kwargs,
            )
            self.add_connection(conn)
            await conn.run()

        handler = grpc.method_handlers_generic_handler(SERVICE, {METHOD: grpc.stream_stream_rpc_method_handler(handle)})
        server.add_generic_rpc_handlers((handler,))
        addr = f"[{host}]:{port}" if ":" in host else f"{listen_host}:{port}"
        try:
            actual = server.add_insecure_port(addr)
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
        params = connector.params
        host, port = connect_address(params, "grpc")
        timeout = _param(params, "connect_timeout", float, DEFAULT_CONNECT_TIMEOUT)
        kwargs = _conn_kwargs(params)
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lt = acquire_loop()
        try:
            conn = self._wait(self._submit(lt, self._open(lt, connector, target, timeout, kwargs)), timeout + 10)
            # On this (connector) thread, so the core's HELLO is queued before the stream runs.
            self.add_connection(conn)
            if self._stopping:  # shutdown() may have closed the others before this one was added
                conn.close()
            # Not cancellable by shutdown(): close() ends run(), which closes the channel.
            lt.submit(conn.run()).result()
        finally:
            release_loop()

    async def _open(
        self, lt: LoopThread, connector: ConnectorInfo, target: str, timeout: float, kwargs: dict
    ) -> GrpcConnection:
        # A local subchannel pool: each SFM connection gets its own TCP connection instead of
        # sharing one with every other channel to the same target in this process.
        options = [*_options(kwargs["max_frame_size"], kwargs["batch"]), ("grpc.use_local_subchannel_pool", 1)]
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
                if self._stopping:
                    error = "the driver is shut down"
                    break
                state = channel.get_state(try_to_connect=True)
                if state == grpc.ChannelConnectivity.READY:
                    break
                if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN):
                    error = "connection failed"
                    break
                if loop.time() > deadline:
                    error = f"not connected within {timeout} s"
                    break
                await asyncio.sleep(0.005)
            if not error and self._stopping:
                error = "the driver is shut down"
            ok = not error
        finally:
            if not ok:
                await channel.close()
        if error:
            del channel
            raise CommError(CommError.CLOSED, f"grpc: cannot connect to {target}: {error}")
        call = channel.stream_stream(METHOD_PATH)()
        return GrpcConnection(
            connector,
            self,
            lt.loop,
            call,
            peer_addr=_grpc_style(target),
            local_addr="",
            channel=channel,
            **kwargs,
        )

    # -- stop ----------------------------------------------------------------------------------

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
        self._stop_listen.set()
        # Pending opens and server starts are not cancelled: they watch _stopping and end by
        # themselves, closing what they made. Cancelling their futures could drop a channel
        # or a started server already on its way back, and leak it.
        super().shutdown()


@sfm_core.hookimpl
def sfm_bench_baseline(scheme: str) -> Any:
    """Bare grpc.aio on the same Stream service (two processes), for ``sfm bench`` rows of ``grpc``."""
    if scheme != "grpc":
        return None
    from .bench import GrpcBaseline

    return GrpcBaseline("aio")
