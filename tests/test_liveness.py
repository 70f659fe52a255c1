"""Liveness and shutdown over real loopback connections (tcp, ws, grpc).

- A stream to a slower receiver is never taken for a dead peer (PING goes ahead of queued
  data, send progress and frames waiting for our receiver count as signs of life), not even
  while the receiver takes longer than the dead timeout over one message.
- A peer that neither reads nor writes (a process frozen with SIGSTOP) is detected, after
  ``dead_after`` heartbeat intervals and not before.
- ``stop()`` first sends what ``send_message`` accepted (the linger), and what it cannot
  send within the linger is counted in a WARNING.
- The ``frame-limit`` handshake extension: a frame over the peer's smaller limit is refused
  with ``CommError(BAD_DATA)`` before anything is sent, and the connection goes on.

Every timeout goes through ``scaled()``; nothing asserts an upper bound on elapsed time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import Collector, StateLog, scaled, serving, wait_ready, wait_until

from sfm_core import (
    MAX_FRAME_SIZE,
    CommError,
    ConnManager,
    ConnState,
    Endpoint,
    EndpointMonitor,
    EndpointState,
    Message,
    MessageReceiver,
    Mode,
)
from sfm_core.frames import PREFIX_LEN

KIB = 1024
MIB = 1024 * 1024
SCHEMES = ["tcp", "ws", "grpc"]
SFM = [sys.executable, "-m", "sfm_core.cli"]

#: Connector params that keep the sender's own driver queue small, so that a sender to a slow
#: receiver really waits for room (TCP queues nothing: the kernel buffers are its queue).
SMALL_SEND_QUEUE = {
    "tcp": {},
    "ws": {"high_water": str(MIB)},
    "grpc": {"send_queue_bytes": str(MIB)},
}
#: ConnManager settings that keep the receiving lane (ws, grpc) small, for the same reason.
SMALL_LANES = {"queue_frames": 64, "queue_bytes": 2 * MIB}


# -- helpers ---------------------------------------------------------------------------------


class Pair:
    """A listening ConnManager "server" and a connecting "site-1", both READY, each with a
    :class:`StateLog` that saw every endpoint state change from the start."""

    def __init__(self, server: ConnManager, client: ConnManager, url: str, client_params: dict | None) -> None:
        self.server, self.client = server, client
        self.server_log, self.client_log = StateLog(), StateLog()
        server.add_endpoint_monitor(self.server_log)
        client.add_endpoint_monitor(self.client_log)
        handle = server.add_connector(url, {}, Mode.PASSIVE)
        server.start()
        self.url = server.wait_listening(handle, scaled(5))
        client.add_connector(self.url, dict(client_params or {}), Mode.ACTIVE)
        client.start()
        self.to_server = wait_ready(client, "server")
        self.to_client = wait_ready(server, "site-1")

    def connections(self) -> tuple[list, list]:
        return self.client.get_connections("server") or [], self.server.get_connections("site-1") or []

    def disconnects(self) -> list:
        return [e for e in self.server_log.events + self.client_log.events if e[1] == EndpointState.DISCONNECTED]


@pytest.fixture
def managers():
    """Factory of ConnManagers; every one is stopped at teardown (last made, first stopped)."""
    made: list[ConnManager] = []

    def make(name: str, **kwargs: Any) -> ConnManager:
        cm = ConnManager(Endpoint(name, {"role": name}), **kwargs)
        made.append(cm)
        return cm

    yield make
    for cm in reversed(made):
        cm.stop()


def make_pair(
    make,
    scheme: str,
    *,
    server_kw: dict | None = None,
    client_kw: dict | None = None,
    client_params: dict | None = None,
    **common: Any,
) -> Pair:
    server = make("server", **{**common, **(server_kw or {})})
    client = make("site-1", **{**common, **(client_kw or {})})
    return Pair(server, client, f"{scheme}://127.0.0.1:0", client_params)


class SequenceReceiver(MessageReceiver):
    """Records header ``i`` of every message (and the payload size), sleeping ``delay`` s per
    message: a receiver slower than its sender. Keeps no payloads (a stream is 100s of MiB).
    Set ``stall`` and the next message takes that long instead (once)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.stall = 0.0
        self.stalled = False
        self.seqs: list[int] = []
        self.sizes: set[int] = set()

    def process_message(self, endpoint: Endpoint, connection: Any, app_id: int, message: Message) -> None:
        if self.stall:
            time.sleep(self.stall)
            self.stall, self.stalled = 0.0, True
        else:
            time.sleep(self.delay)
        self.seqs.append(message.headers["i"])
        self.sizes.add(0 if message.payload is None else len(message.payload))


class TimedStateLog(EndpointMonitor):
    """Endpoint state changes with the monotonic time each was told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, EndpointState, float]] = []

    def state_change(self, endpoint: Endpoint) -> None:
        self.events.append((endpoint.name, endpoint.state, time.monotonic()))

    def when(self, name: str, state: EndpointState) -> float | None:
        return next((t for n, s, t in self.events if n == name and s == state), None)

    def count(self, name: str, state: EndpointState) -> int:
        return sum(1 for n, s, _ in self.events if n == name and s == state)


@contextlib.contextmanager
def connecting_peer(argv: list[str]) -> Iterator[subprocess.Popen]:
    """Run ``sfm serve --connect ...``; like ``helpers.serving`` for a peer that connects.

    Its first line is not awaited: "endpoint ...: READY" may come before "connecting to", and
    reading stderr of a process still running would block. The caller waits for the peer READY.
    """
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(scaled(10))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_in_thread(cm: ConnManager, **kwargs: Any) -> None:
    """``cm.stop(**kwargs)`` on a thread of its own: a stop that hangs fails here, clearly."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            cm.stop(**kwargs)
        except BaseException as e:  # reported below, on the test's thread
            errors.append(e)

    t = threading.Thread(target=run, name="test-stop")
    t.start()
    t.join(scaled(30))
    assert not t.is_alive(), "stop() did not return"
    if errors:
        raise errors[0]


# -- 1. a slow receiver is not a dead peer ---------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_stream_to_a_slower_receiver_is_never_cut(managers, scheme):
    interval = scaled(0.2)
    dead_after = 3
    p = make_pair(
        managers,
        scheme,
        client_params=SMALL_SEND_QUEUE[scheme],
        heartbeat_interval=interval,
        heartbeat_check=scaled(0.05),
        dead_after=dead_after,
        **SMALL_LANES,
    )
    rx = SequenceReceiver(delay=0.002)
    p.server.register_message_receiver(1, rx)
    client_conns, server_conns = p.connections()
    assert len(client_conns) == 1 and len(server_conns) == 1

    chunk = bytes(64 * KIB)
    sent = [0]
    errors: list[CommError] = []
    stop = threading.Event()

    def stream() -> None:
        i = 0
        while not stop.is_set():
            try:
                p.client.send_message(p.to_server, 1, {"i": i}, chunk)
            except CommError as e:
                errors.append(e)
                return
            i += 1
            sent[0] = i

    sender = threading.Thread(target=stream, name="test-stream")
    sender.start()
    changed: list = []
    try:
        # At least five dead timeouts of streaming, watching the connections throughout. A
        # third of the way in, the receiver takes two dead timeouts over one message: frames
        # waiting for our receiver mean we are the slow side, not that the peer is dead.
        start = time.monotonic()
        end = start + max(scaled(3.0), 5 * dead_after * interval)
        stall_at = start + (end - start) / 3
        while time.monotonic() < end and not errors:
            if stall_at and time.monotonic() >= stall_at:
                rx.stall, stall_at = 2 * dead_after * interval, 0.0
            now = p.connections()
            if now != (client_conns, server_conns):
                changed.append(now)
                break
            time.sleep(0.02)
        backlog = sent[0] - len(rx.seqs)
    finally:
        stop.set()
        sender.join(scaled(30))
    assert not sender.is_alive(), "the sender is still blocked after the receiver had time to drain"
    assert not errors, f"the sender got {errors[0]!r} after {sent[0]} messages"
    assert not p.disconnects(), p.disconnects()
    assert not changed, f"connections changed during the stream: {changed[0]} (were {client_conns}, {server_conns})"
    wait_until(lambda: len(rx.seqs) >= sent[0], 30, f"{sent[0]} messages (have {len(rx.seqs)})")
    assert rx.seqs == list(range(sent[0])), "messages lost, repeated or out of order"
    assert rx.sizes == {len(chunk)}
    assert rx.stalled, "the receiver never stalled"
    # The test did what it says: the sender was ahead of the receiver (held back by backpressure).
    assert backlog >= 4, f"only {backlog} messages were in flight: the receiver was not the slow side"
    assert p.connections() == (client_conns, server_conns)
    assert not p.disconnects()
    # Heartbeats went on during the stream, both ways, whatever the traffic.
    assert client_conns[0].session.pongs_received > 0
    assert server_conns[0].session.pongs_received > 0


# -- 2. a partitioned peer is detected -------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("we_are", ["active", "passive"])
def test_a_partitioned_peer_is_detected(managers, scheme, we_are):
    interval = scaled(0.2)
    check = scaled(0.05)
    dead_after = 3
    dead_timeout = dead_after * interval
    log = TimedStateLog()
    cm = managers("watcher", heartbeat_interval=interval, heartbeat_check=check, dead_after=dead_after)
    cm.add_endpoint_monitor(log)
    echoes = Collector()
    cm.register_message_receiver(1, echoes)
    # The peer pings too (short heartbeat) and echoes app 1, so we can see it alive at a known time.
    peer_args = ["--name", "frozen", "--heartbeat", str(interval), "--echo", "1"]

    def partition(proc: subprocess.Popen) -> None:
        peer = wait_ready(cm, "frozen", 20)
        [conn] = cm.get_connections("frozen")
        cm.send_message(peer, 1, {"n": 1}, b"are you there?")
        echoes.wait_for(1)
        heard_at = time.monotonic()  # the peer was heard just now
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            closed_at = wait_until(
                lambda: log.when("frozen", EndpointState.DISCONNECTED), 4 * dead_after * 0.2 + 5, "frozen peer gone"
            )
            wait_until(lambda: cm.get_connections("frozen") is None, what="the connection forgotten")
            wait_until(lambda: conn.conn.state == ConnState.CLOSED, what="the driver connection closed")
            # Nothing arrived after heard_at (less the time the echo took to reach our receiver,
            # at most a heartbeat check): dead only after dead_after intervals of silence.
            assert closed_at - heard_at >= dead_timeout - check, (closed_at - heard_at, dead_timeout)
            # The partition heals: a new connection, and the peer is READY again. (Waiting for
            # it also keeps SIGTERM away from the moment the peer resumes: the SIGTERM handler
            # of `sfm serve` (cli._wait_for_signal) calls Event.set(), which deadlocks when the
            # signal lands while the main thread re-takes that Event's lock in wait(), as it
            # does right after SIGCONT; the process then ignores SIGTERM and is killed late.)
            os.kill(proc.pid, signal.SIGCONT)
            wait_until(lambda: log.count("frozen", EndpointState.READY) >= 2, 20, "the peer READY again")
            assert cm.get_connections("frozen") not in (None, [conn])
        finally:
            os.kill(proc.pid, signal.SIGCONT)

    if we_are == "active":
        with serving([*SFM, "serve", f"{scheme}://127.0.0.1:0", *peer_args]) as (proc, url):
            cm.add_connector(url, {}, Mode.ACTIVE)
            cm.start()
            partition(proc)
    else:
        handle = cm.add_connector(f"{scheme}://127.0.0.1:0", {}, Mode.PASSIVE)
        cm.start()
        url = cm.wait_listening(handle, scaled(5))
        with connecting_peer([*SFM, "serve", url, "--connect", *peer_args]) as proc:
            partition(proc)


# -- 3. stop() sends what was accepted -------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("sender_side", ["client", "server"])
def test_stop_sends_what_send_message_accepted(managers, scheme, sender_side):
    # Small lanes: the slow receiver's backpressure reaches the transport, so that at stop()
    # frames are still queued in the sender's driver and in the transport's own buffers.
    p = make_pair(managers, scheme, **SMALL_LANES)
    if sender_side == "client":
        sender, receiver, to_receiver, receiver_log = p.client, p.server, p.to_server, p.server_log
    else:
        sender, receiver, to_receiver, receiver_log = p.server, p.client, p.to_client, p.client_log
    sender_name = sender.local_endpoint.name
    got = Collector(delay=0.0005)  # a bit slower than the sender
    receiver.register_message_receiver(1, got)
    n = 2000
    chunk = bytes(4 * KIB)
    for i in range(n):
        sender.send_message(to_receiver, 1, {"i": i}, chunk)
    stop_in_thread(sender)
    # The receiver hears of the loss after the frames that arrived before it were delivered.
    wait_until(lambda: (sender_name, EndpointState.DISCONNECTED) in receiver_log.events, 30, "the sender gone")
    with contextlib.suppress(AssertionError):
        got.wait_for(n, timeout=5)
    seqs = [m[2]["i"] for m in got.messages]
    assert len(seqs) == n, f"{n - len(seqs)} of {n} accepted messages never arrived"
    assert seqs == list(range(n))


# -- 4. what the linger cannot send is counted ------------------------------------------------

_LINGER_WARNING = re.compile(r"(\d+) frame\(s\) accepted for .* linger")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_linger_drops_are_counted_and_logged(managers, scheme, caplog):
    p = make_pair(managers, scheme, client_params=SMALL_SEND_QUEUE[scheme], queue_frames=16, queue_bytes=MIB)
    got = Collector()
    gate = got.gate = threading.Event()  # the receiver is stuck until the end
    p.server.register_message_receiver(1, got)
    chunk = bytes(64 * KIB)
    accepted: list[int] = []
    errors: list[CommError] = []

    def fill() -> None:
        i = 0
        while True:
            try:
                p.client.send_message(p.to_server, 1, {"i": i}, chunk)
            except CommError as e:
                errors.append(e)
                return
            accepted.append(i)
            i += 1

    sender = threading.Thread(target=fill, name="test-fill")
    sender.start()
    try:
        # Queues full: no send has returned for a while (the sender waits for room).
        seen = [-1, time.monotonic()]

        def stalled() -> bool:
            if errors:
                return True
            if len(accepted) != seen[0]:
                seen[:] = [len(accepted), time.monotonic()]
                return False
            return time.monotonic() - seen[1] >= scaled(0.3)

        wait_until(stalled, 30, "the sender blocked on full queues")
        assert not errors, errors
        assert accepted, "nothing was sent"
        linger = scaled(0.3)
        with caplog.at_level(logging.WARNING):
            stop_in_thread(p.client, linger=linger)
            sender.join(scaled(10))
            assert not sender.is_alive(), "the blocked sender was not released by stop()"
        records = [r for r in caplog.records if _LINGER_WARNING.search(r.getMessage())]
        assert len(records) <= 1, [r.getMessage() for r in records]
        dropped = int(_LINGER_WARNING.search(records[0].getMessage()).group(1)) if records else 0
        if records:
            message = records[0].getMessage()
            assert records[0].levelno == logging.WARNING
            assert f"{linger:.1f} s linger" in message, message
            assert "server" in message, message  # names the peer
        # The send that was waiting is refused (its caller knows that message did not go), or,
        # on TCP, it finished during the linger and the next one was refused.
        assert len(errors) == 1 and errors[0].code in (CommError.CLOSED, CommError.ERROR), errors
        if scheme == "tcp":
            # TCP queues nothing of its own: every frame accepted is in the kernel. The linger
            # reports the one frame in flight (a sender blocked in the kernel with part of it on
            # the wire: SfmConnection.drain counts 1), unless the kernel took the rest of it
            # during the linger; then there is nothing to report.
            assert dropped in (0, 1), [r.getMessage() for r in records]
            if dropped:
                assert "while sending" in errors[0].message, errors
        else:
            # The driver's queue was full (the sender waited for room): those frames are dropped.
            assert dropped >= 1, [r.getMessage() for r in caplog.records]
    finally:
        gate.set()
        sender.join(scaled(10))
    # What did arrive arrived once and in order; nothing beyond what was accepted.
    wait_until(lambda: ("site-1", EndpointState.DISCONNECTED) in p.server_log.events, 30, "site-1 gone")
    seqs = [m[2]["i"] for m in got.messages]
    assert seqs == list(range(len(seqs))) and len(seqs) <= len(accepted)
    if scheme == "tcp":
        assert len(seqs) == len(accepted), "TCP had every accepted frame in the kernel, before the FIN"


# -- 5. the peer's frame limit ----------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("limited", ["server", "client"])
def test_a_frame_over_the_peers_limit_is_refused_before_sending(managers, scheme, limited):
    limit = 64 * KIB
    small = {"max_frame_size": limit}
    if limited == "server":
        p = make_pair(managers, scheme, server_kw=small)
        sender, receiver, to_receiver = p.client, p.server, p.to_server
    else:
        p = make_pair(managers, scheme, client_kw=small)
        sender, receiver, to_receiver = p.server, p.client, p.to_client
    got = Collector()
    receiver.register_message_receiver(1, got)
    before = p.connections()

    with pytest.raises(CommError) as e:
        sender.send_message(to_receiver, 1, None, bytes(100 * KIB))
    assert e.value.code == CommError.BAD_DATA, e.value
    message = str(e.value)
    assert str(limit) in message and str(MAX_FRAME_SIZE) in message, message
    # The boundary: one byte over the peer's limit is refused, a frame of exactly it goes.
    with pytest.raises(CommError) as e:
        sender.send_message(to_receiver, 1, None, bytes(limit - PREFIX_LEN + 1))
    assert e.value.code == CommError.BAD_DATA, e.value
    sender.send_message(to_receiver, 1, None, bytes(limit - PREFIX_LEN))
    sender.send_message(to_receiver, 1, {"after": 1}, b"small")
    msgs = got.wait_for(2)
    assert [m[3] for m in msgs] == [bytes(limit - PREFIX_LEN), b"small"]
    assert msgs[1][2] == {"after": 1}
    # The connection stayed up: the same one on both sides, never DISCONNECTED.
    assert p.connections() == before
    assert not p.disconnects(), p.disconnects()
