"""Test helpers: waiting for conditions, collecting messages, and a raw-socket SFM peer.

Every helper that takes a ``timeout`` scales it itself (:func:`scaled`): pass plain seconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from sfm_core import Endpoint, EndpointMonitor, EndpointState, Message, MessageReceiver
from sfm_core.frames import FrameDecoder, FrameType, decode_frame, encode_frame
from sfm_core.handshake import build_handshake
from sfm_core.url import parse_url

#: Every timeout a test waits with is multiplied by this (a slow or loaded machine sets it
#: higher, as websockets' suite does with WEBSOCKETS_TESTS_TIMEOUT_FACTOR). A timeout is a
#: bound on waiting for an event, never a speed assertion.
TIMEOUT_FACTOR = float(os.environ.get("SFM_TESTS_TIMEOUT_FACTOR", "1"))


def scaled(seconds: float) -> float:
    """``seconds`` times :data:`TIMEOUT_FACTOR`: how long a test may wait for an event."""
    return seconds * TIMEOUT_FACTOR


def wait_until(cond: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """Poll ``cond`` until it is truthy (returning its value), for up to ``scaled(timeout)``."""
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_ready(manager: Any, name: str, timeout: float = 5.0) -> Endpoint:
    def ready() -> Endpoint | None:
        ep = manager.find_endpoint(name)
        return ep if ep is not None and ep.state == EndpointState.READY else None

    return wait_until(ready, timeout, f"{name} READY")


class Collector(MessageReceiver):
    """Keeps every message it receives (payload copied to bytes, or None)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.messages: list[tuple[str, int, dict | None, bytes | None, type]] = []
        self.lock = threading.Lock()
        self.delay = delay
        self.gate: threading.Event | None = None

    def process_message(self, endpoint: Endpoint, connection: Any, app_id: int, message: Message) -> None:
        if self.gate is not None:
            self.gate.wait(scaled(30))
        if self.delay:
            time.sleep(self.delay)
        payload = message.payload
        with self.lock:
            self.messages.append(
                (endpoint.name, app_id, message.headers, None if payload is None else bytes(payload), type(payload))
            )

    def wait_for(self, n: int, timeout: float = 10.0) -> list:
        wait_until(lambda: len(self.messages) >= n, timeout, f"{n} messages (have {len(self.messages)})")
        return list(self.messages)


class StateLog(EndpointMonitor):
    def __init__(self) -> None:
        self.events: list[tuple[str, EndpointState]] = []

    def state_change(self, endpoint: Endpoint) -> None:
        self.events.append((endpoint.name, endpoint.state))


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True once the other side closes ``sock`` within ``scaled(timeout)`` (what arrives
    meanwhile is dropped)."""
    sock.settimeout(scaled(timeout))
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def unread_bytes(sock: socket.socket | int) -> int:
    """Bytes that arrived on a TCP socket (or descriptor) and were not read yet (FIONREAD)."""
    fd = sock if isinstance(sock, int) else sock.fileno()
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


class RawPeer:
    """A bare TCP socket speaking SFM through the sans-I/O codec (for bad-input tests)."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        params = parse_url(url)
        address = (params.get("host", "127.0.0.1"), params["port"])
        self.sock = socket.create_connection(address, timeout=scaled(timeout))
        self.decoder = FrameDecoder()
        self.frames: list = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(
        self,
        ftype: int,
        app_id: int = 0,
        stream_id: int = 1,
        headers: dict | None = None,
        payload: bytes | None = None,
        sequence: int = 1,
    ) -> None:
        self.send(b"".join(encode_frame(ftype, app_id, stream_id, headers, payload, sequence=sequence)))

    def hello(self, name: str, properties: dict | None = None) -> None:
        self.send_frame(FrameType.HELLO, payload=build_handshake(name, properties))

    def handshake(self, name: str, properties: dict | None = None, timeout: float = 5.0):
        """Send HELLO as ``name`` and return the READY that must answer it."""
        self.hello(name, properties)
        ready = self.read_frame(timeout)
        assert ready.type == FrameType.READY, f"expected READY, got frame type {ready.type}"
        return ready

    def read_frame(self, timeout: float = 5.0):
        """The next frame, waiting up to ``scaled(timeout)`` for it (``TimeoutError`` if none)."""
        self.sock.settimeout(scaled(timeout))
        while not self.frames:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("peer closed")
            self.frames.extend(self.decoder.feed(data))
        return decode_frame(self.frames.pop(0))

    def is_closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True once the other side closes the connection (reads and drops frames meanwhile)."""
        return closed_by_peer(self.sock, timeout)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def serving(argv: list[str]) -> Iterator[tuple[subprocess.Popen, str]]:
    """Run an ``sfm serve`` command line; yield the process and the URL it listens on.

    On exit the process gets SIGTERM (and is killed if it lingers) and its pipes are closed.
    """
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert "listening on" in first, first + proc.stderr.read()
        yield proc, first.rsplit(" ", 1)[1].strip()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(scaled(10))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
