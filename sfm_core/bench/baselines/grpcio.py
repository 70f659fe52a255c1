"""grpcio (``grpc.aio``, as the driver uses it): one bidirectional stream, one gRPC message
per ``send``, bytes as they are.

No protobuf: a generic ``stream_stream`` method without serializers moves the bytes, the
least a gRPC transport can do. The stream is ``/streamer.Streamer/Stream``, the driver's path.
"""

from __future__ import annotations

import asyncio
from typing import Any

from . import Buffer, missing, version

_OPTIONS = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]
_SERVICE, _METHOD = "streamer.Streamer", "Stream"


class GrpcLink:
    """One stream: ``read``/``write`` of a call (client) or of a handler's context (server)."""

    def __init__(self, stream: Any, on_close: Any) -> None:
        self.stream, self.on_close = stream, on_close

    async def send(self, payload: Buffer) -> None:
        """One message (grpcio takes bytes)."""
        await self.stream.write(payload if isinstance(payload, bytes) else bytes(payload))

    async def recv(self) -> bytes:
        """The next message."""
        import grpc

        msg = await self.stream.read()
        if msg is grpc.aio.EOF:
            raise ConnectionError("stream ended")
        return msg

    async def close(self) -> None:
        """End the stream."""
        await self.on_close()


class GrpcListener:
    """A ``grpc.aio`` server with the one stream method; its calls are handed to ``accept``."""

    def __init__(self) -> None:
        self.links: asyncio.Queue[GrpcLink] = asyncio.Queue()
        self.server: Any = None
        self.address = ""

    async def start(self) -> GrpcListener:
        import grpc

        async def stream(request_iterator: Any, context: Any) -> None:
            closed = asyncio.Event()

            async def close() -> None:
                closed.set()

            await self.links.put(GrpcLink(context, close))
            await closed.wait()  # the stream lives as long as the handler

        method = grpc.stream_stream_rpc_method_handler(stream)
        handler = grpc.method_handlers_generic_handler(_SERVICE, {_METHOD: method})
        self.server = grpc.aio.server(options=_OPTIONS)
        self.server.add_generic_rpc_handlers((handler,))
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        await self.server.start()
        return self

    async def accept(self, timeout: float) -> GrpcLink:
        """The first stream."""
        return await asyncio.wait_for(self.links.get(), timeout)

    async def close(self) -> None:
        """Stop the server at once."""
        await self.server.stop(0)


class GrpcioBaseline:
    """Bare grpcio (``grpc.aio``), the baseline of ``grpc``."""

    @property
    def name(self) -> str:
        """``bare grpcio VERSION``."""
        return f"bare grpcio {version('grpcio')}"

    def available(self) -> str | None:
        """Only if grpcio is installed."""
        return missing("grpc")

    async def listen(self) -> GrpcListener:
        """Serve on 127.0.0.1, any port."""
        return await GrpcListener().start()

    async def connect(self, address: str) -> GrpcLink:
        """Open a channel (waiting until it is connected) and one stream on it."""
        import grpc

        channel = grpc.aio.insecure_channel(address, options=_OPTIONS)
        await asyncio.wait_for(channel.channel_ready(), 30)
        call = channel.stream_stream(f"/{_SERVICE}/{_METHOD}")()

        async def close() -> None:
            call.cancel()
            await channel.close()

        return GrpcLink(call, close)
