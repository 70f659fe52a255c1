"""The raw-socket baseline: length-prefixed blocking sockets, one send per message.

The receiver allocates a fresh buffer per message and ``recv_into`` it, as any framework must.
"""

from __future__ import annotations

import socket
import struct

_LEN = struct.Struct(">I")


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    while view:
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("peer closed")
        view = view[n:]


def recv_message(sock: socket.socket) -> bytearray:
    head = bytearray(4)
    recv_exact_into(sock, memoryview(head))
    (n,) = _LEN.unpack(head)
    buf = bytearray(n)
    recv_exact_into(sock, memoryview(buf))
    return buf


def send_message(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_LEN.pack(len(payload)) + payload)


def send_large(sock: socket.socket, payload: bytes) -> None:
    """Send a large payload without concatenating it to its prefix."""
    sock.sendall(_LEN.pack(len(payload)))
    sock.sendall(payload)
