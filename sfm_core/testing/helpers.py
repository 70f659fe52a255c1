"""Small helpers of the conformance suite: waiting, collecting messages, resource snapshots.

Copied in spirit from this repository's own ``tests/helpers.py`` (the suite ships in the
wheel and must not import the repository's tests). Every timeout is a bound on waiting for an
event, never a speed assertion, and is multiplied by ``SFM_TESTS_TIMEOUT_FACTOR``.
"""

from __future__ import annotations

import os
import queue
import resource
import stat
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from sfm_core import ConnMonitor, ConnState, Endpoint, EndpointMonitor, EndpointState, Message, MessageReceiver

#: Every timeout the suite waits with is multiplied by this (set it on a slow machine).
TIMEOUT_FACTOR = float(os.environ.get("SFM_TESTS_TIMEOUT_FACTOR", "1"))
#: Threads libraries keep for the life of the process, started on first use: not leaks.
PROCESS_GLOBAL_THREAD_PREFIXES = ("grpc", "ThreadPoolExecutor", "asyncio_")
MIB = 1024 * 1024


def scaled(seconds: float) -> float:
    """``seconds`` times :data:`TIMEOUT_FACTOR`."""
    return seconds * TIMEOUT_FACTOR


def wait_until(cond: Callable[[], Any], timeout: float = 5.0, what: str = "condition", rule: str = "") -> Any:
    """Poll ``cond`` until it is truthy (returning its value), for up to ``scaled(timeout)``;
    then fail with ``what`` and the ``rule`` it checks."""
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}" + (f"; {rule}" if rule else ""))
        time.sleep(0.005)


class Collector(MessageReceiver):
    """Keeps every message it receives: ``(endpoint name, headers, payload bytes or None, payload type)``.

    ``gate``: when set to an unset ``threading.Event``, the receiver blocks until it is set
    (a slow receiver)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, dict | None, bytes | None, type]] = []
        self.lock = threading.Lock()
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def process_message(self, endpoint: Endpoint, connection: Any, app_id: int, message: Message) -> None:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(scaled(60))
        payload = message.payload
        with self.lock:
            self.messages.append(
                (endpoint.name, message.headers, None if payload is None else bytes(payload), type(payload))
            )

    def wait_for(self, n: int, timeout: float = 10.0, rule: str = "") -> list:
        wait_until(lambda: len(self.messages) >= n, timeout, f"{n} messages (have {len(self.messages)})", rule)
        return list(self.messages)


class Echo(MessageReceiver):
    """Sends every message back to its sender (same app_id, headers and payload), in order,
    from a thread of its own (never from the receiving thread)."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="sfm-conformance-echo", daemon=True)
        self.thread.start()

    def process_message(self, endpoint: Endpoint, connection: Any, app_id: int, message: Message) -> None:
        payload = None if message.payload is None else bytes(message.payload)
        self.queue.put((endpoint, app_id, message.headers, payload))

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            endpoint, app_id, headers, payload = item
            try:
                self.manager.send_message(endpoint, app_id, headers, payload)
            except Exception as e:  # reported by the parent as a missing echo
                print(f"echo failed: {e}", flush=True)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(scaled(10))


class StateLog(EndpointMonitor):
    """Every endpoint state change, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, EndpointState]] = []

    def state_change(self, endpoint: Endpoint) -> None:
        self.events.append((endpoint.name, endpoint.state))


class ConnLog(ConnMonitor):
    """A bare driver's connections, as its monitor sees them (no ConnManager involved)."""

    def __init__(self) -> None:
        self.connected: list[Any] = []
        self.closed: list[Any] = []
        self.frames: list[bytes] = []

    def state_change(self, connection: Any) -> None:
        if connection.state == ConnState.CONNECTED:
            connection.register_frame_receiver(_FrameLog(self.frames))
            self.connected.append(connection)
        elif connection.state == ConnState.CLOSED:
            self.closed.append(connection)


class _FrameLog:
    def __init__(self, frames: list) -> None:
        self.frames = frames

    def process_frame(self, frame: Any) -> None:
        self.frames.append(b"".join(frame) if isinstance(frame, list) else bytes(frame))

    def process_frames(self, frames: Iterable[Any]) -> None:
        for frame in frames:
            self.process_frame(frame)

    def bytes_received(self) -> None:
        pass

    def bytes_sent(self) -> None:
        pass


def rss_bytes() -> int:
    """This process's resident set size now (``/proc/self/statm``; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def open_fds() -> dict[int, str]:
    """This process's open descriptors and what each is (Linux: ``/proc/self/fd``)."""
    out: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the descriptor listdir itself used
    return out


def threads(extra_global_prefixes: Iterable[str] = ()) -> set[threading.Thread]:
    """The live threads, less the process-global ones libraries keep."""
    prefixes = PROCESS_GLOBAL_THREAD_PREFIXES + tuple(extra_global_prefixes)
    return {t for t in threading.enumerate() if not t.name.startswith(prefixes)}


def socket_files(directory: str) -> list[str]:
    """Unix socket files left under ``directory``."""
    found = []
    for root, _dirs, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    found.append(path)
            except OSError:
                pass
    return found
