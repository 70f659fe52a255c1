"""grpcio (sync API): one bidirectional stream, one gRPC message per ``send``, bytes as they are.

No protobuf: a generic ``stream_stream`` method without serializers moves the bytes, the
least a gRPC transport can do. The stream is ``/streamer.Streamer/Stream``, the path the
driver uses.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

from . import Buffer, missing, version

_OPTIONS = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]
_SERVICE, _METHOD = "streamer.Streamer", "Stream"


class GrpcLink:
    """One stream: sends go through a queue the gRPC request iterator drains (sync grpcio's way)."""

    def __init__(self, incoming: Iterator[bytes], outgoing: queue.SimpleQueue, on_close: Any = None) -> None:
        self.incoming, self.outgoing, self.on_close = incoming, outgoing, on_close

    def send(self, payload: Buffer) -> None:
        """Queue one message (grpcio takes bytes)."""
        self.outgoing.put(payload if isinstance(payload, bytes) else bytes(payload))

    def recv(self) -> bytes:
        """The next message."""
        return next(self.incoming)

    def close(self) -> None:
        """End the stream."""
        self.outgoing.put(None)
        if self.on_close is not None:
            self.on_close()


class GrpcListener:
    """A sync ``grpc.server`` with the one stream method; its calls are handed to ``accept``."""

    def __init__(self) -> None:
        from concurrent import futures

        import grpc

        self.links: queue.SimpleQueue[GrpcLink] = queue.SimpleQueue()

        def stream(request_iterator: Iterator[bytes], context: Any) -> Iterator[bytes]:
            out: queue.SimpleQueue = queue.SimpleQueue()
            self.links.put(GrpcLink(request_iterator, out))
            yield from iter(out.get, None)

        handler = grpc.method_handlers_generic_handler(
            _SERVICE, {_METHOD: grpc.stream_stream_rpc_method_handler(stream)}
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=_OPTIONS)
        self.server.add_generic_rpc_handlers((handler,))
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def accept(self, timeout: float) -> GrpcLink:
        """The first stream."""
        return self.links.get(timeout=timeout)

    def close(self) -> None:
        """Stop the server at once."""
        self.server.stop(0).wait(10)


class GrpcioBaseline:
    """Bare grpcio (sync), the baseline of ``grpc``."""

    @property
    def name(self) -> str:
        """``bare grpcio VERSION``."""
        return f"bare grpcio {version('grpcio')}"

    def available(self) -> str | None:
        """Only if grpcio is installed."""
        return missing("grpc")

    def listen(self) -> GrpcListener:
        """Serve on 127.0.0.1, any port."""
        return GrpcListener()

    def connect(self, address: str) -> GrpcLink:
        """Open a channel (waiting until it is connected) and one stream on it."""
        import grpc

        channel = grpc.insecure_channel(address, options=_OPTIONS)
        grpc.channel_ready_future(channel).result(timeout=30)
        out: queue.SimpleQueue = queue.SimpleQueue()
        call = channel.stream_stream(f"/{_SERVICE}/{_METHOD}")(iter(out.get, None))
        lock = threading.Lock()

        def close() -> None:
            with lock:
                call.cancel()
                channel.close()

        return GrpcLink(call, out, close)
