"""pyzmq: a PAIR socket over TCP, one ``send`` per message (a reference row, when installed).

ZeroMQ batches small messages in its I/O thread, so its rate is a reference for what a
batching transport gets on this machine, not a floor.
"""

from __future__ import annotations

from typing import Any

from . import Buffer, missing, version

#: Above this a payload is sent without copying it into a zmq message (zmq's own advice).
_COPY_MAX = 64 * 1024


class ZmqLink:
    """One PAIR socket (and its context, which this link owns)."""

    def __init__(self, ctx: Any, sock: Any) -> None:
        self.ctx, self.sock = ctx, sock

    def send(self, payload: Buffer) -> None:
        """One zmq message."""
        self.sock.send(payload, copy=len(memoryview(payload)) <= _COPY_MAX)

    def recv(self) -> Buffer:
        """The next message (a view of zmq's buffer: not copied)."""
        return self.sock.recv(copy=False).buffer

    def close(self) -> None:
        """Close the socket without lingering, then the context."""
        self.sock.close(linger=0)
        self.ctx.term()


class ZmqListener:
    """A bound PAIR socket; ZeroMQ connects in the background, so accept returns at once."""

    def __init__(self) -> None:
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PAIR)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"

    def accept(self, timeout: float) -> ZmqLink:
        """The bound socket as the link (PAIR talks to its one peer)."""
        return ZmqLink(self.ctx, self.sock)

    def close(self) -> None:
        """Nothing left: the link owns the socket."""


class PyzmqBaseline:
    """pyzmq PAIR over TCP."""

    @property
    def name(self) -> str:
        """``pyzmq VERSION``."""
        return f"pyzmq {version('pyzmq')}"

    def available(self) -> str | None:
        """Only if pyzmq is installed."""
        return missing("zmq")

    def listen(self) -> ZmqListener:
        """Bind on 127.0.0.1, any port."""
        return ZmqListener()

    def connect(self, address: str) -> ZmqLink:
        """Connect a PAIR socket to ``address`` (``tcp://host:port``)."""
        import zmq

        ctx = zmq.Context()
        sock = ctx.socket(zmq.PAIR)
        sock.connect(address)
        return ZmqLink(ctx, sock)
