"""Raw sockets: length-prefixed blocking TCP, one ``sendall`` per message, TCP_NODELAY.

The receiver allocates a fresh buffer per message and ``recv_into`` it, as any framework must.
"""

from __future__ import annotations

import socket
import struct

from . import Buffer

_LEN = struct.Struct(">I")
#: Above this a payload is sent after its prefix rather than concatenated to it (no copy).
_CONCAT_MAX = 64 * 1024


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; ConnectionError if the peer closes first."""
    while view:
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("peer closed")
        view = view[n:]


class RawLink:
    """One length-prefixed message per ``sendall``."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock

    def send(self, payload: Buffer) -> None:
        """Prefix and payload in one ``sendall`` (two above 64 KiB, to not copy it)."""
        n = len(memoryview(payload))
        if n <= _CONCAT_MAX:
            self.sock.sendall(_LEN.pack(n) + payload)
        else:
            self.sock.sendall(_LEN.pack(n))
            self.sock.sendall(payload)

    def recv(self) -> bytearray:
        """The next message, in a fresh buffer."""
        head = bytearray(4)
        recv_exact_into(self.sock, memoryview(head))
        (n,) = _LEN.unpack(head)
        buf = bytearray(n)
        recv_exact_into(self.sock, memoryview(buf))
        return buf

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


class RawListener:
    """A listening TCP socket on 127.0.0.1."""

    def __init__(self) -> None:
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(1)
        self.address = f"127.0.0.1:{self.srv.getsockname()[1]}"

    def accept(self, timeout: float) -> RawLink:
        """The first connection."""
        self.srv.settimeout(timeout)
        conn, _ = self.srv.accept()
        conn.settimeout(None)
        return RawLink(conn)

    def close(self) -> None:
        """Close the listening socket."""
        self.srv.close()


class RawBaseline:
    """Raw sockets, the baseline of ``tcp`` (and of the floors in ``docs/benchmarks.md``)."""

    name = "raw"

    def available(self) -> str | None:
        """Always available."""
        return None

    def listen(self) -> RawListener:
        """Listen on 127.0.0.1, any port."""
        return RawListener()

    def connect(self, address: str) -> RawLink:
        """Connect to ``host:port``."""
        host, port = address.rsplit(":", 1)
        return RawLink(socket.create_connection((host, int(port))))
