"""The passive handshake's ordering guarantees, checked deterministically on an in-memory connection."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from helpers import StateLog

from sfm_core import CommError, Connection, ConnManager, Endpoint, EndpointState, FrameType
from sfm_core.driver import ConnState
from sfm_core.frames import decode_frame, encode_frame
from sfm_core.handshake import build_handshake

HELLO = b"".join(encode_frame(FrameType.HELLO, 0, 1, None, build_handshake("site-1", {})))


class RecordingConnection(Connection):
    """Keeps what is sent; when READY goes out, first lets ``on_ready`` race it."""

    inline_delivery = True

    def __init__(self) -> None:
        super().__init__(None)
        self.sent: list[int] = []
        self.on_ready = lambda: None

    def get_conn_properties(self) -> dict:
        return {}

    def close(self) -> None:
        self.state = ConnState.CLOSED

    def send_frame(self, frame) -> None:
        ftype = decode_frame(b"".join(frame)).type
        if ftype == FrameType.READY:
            self.on_ready()
        self.sent.append(ftype)


@pytest.fixture
def manager() -> Iterator[ConnManager]:
    m = ConnManager(Endpoint("server"))
    m.log = StateLog()  # what its endpoint monitors heard
    m.add_endpoint_monitor(m.log)
    yield m
    m.stop()


def connect(manager: ConnManager, conn: RecordingConnection) -> None:
    """The driver reports ``conn`` and it delivers site-1's HELLO (READY is sent inline)."""
    conn.state = ConnState.CONNECTED
    manager.state_change(conn)
    conn.process_frame(HELLO)


def lose(manager: ConnManager, conn: RecordingConnection) -> None:
    """The driver reports ``conn`` closed."""
    conn.state = ConnState.CLOSED
    manager.state_change(conn)


def in_thread(fn, *args, timeout: float = 5.0) -> threading.Thread:
    """Run ``fn`` on another thread and wait up to ``timeout`` for it."""
    t = threading.Thread(target=fn, args=args)
    t.start()
    t.join(timeout)
    return t


def test_the_endpoint_is_known_before_ready_and_nothing_overtakes_ready(manager) -> None:
    conn = RecordingConnection()
    seen: dict = {}

    def race_ready() -> None:
        # The endpoint must already be known here; a message sent to it from another thread
        # right now has to wait for READY to be on the wire.
        seen["known"] = manager.find_endpoint("site-1") is not None

        def send() -> None:
            try:
                manager.send_message(manager.find_endpoint("site-1"), 1, None, b"eager")
            except CommError as e:
                seen["error"] = e

        racer = in_thread(send, timeout=0.3)
        seen["racer_done_before_ready"] = not racer.is_alive()
        seen["racer"] = racer

    conn.on_ready = race_ready
    connect(manager, conn)
    seen["racer"].join(5)
    assert seen["known"], "READY went out before the endpoint was recorded"
    assert not seen["racer_done_before_ready"], "a DATA send did not wait for READY"
    assert "error" not in seen
    assert conn.sent == [FrameType.READY, FrameType.DATA]


def test_a_connection_lost_before_ready_is_told_is_never_told(manager) -> None:
    # The endpoint is recorded, then its connection closes on another thread before the
    # handshake thread tells monitors READY: a READY told after the loss would leave monitors
    # believing in an endpoint that is gone, and a DISCONNECTED alone would be news of an
    # endpoint they never heard of.
    conn = RecordingConnection()
    conn.on_ready = lambda: in_thread(lose, manager, conn)
    connect(manager, conn)
    assert manager.find_endpoint("site-1") is None
    assert manager.log.events == []


def test_an_endpoint_is_published_only_once_it_can_take_messages(manager) -> None:
    # find_endpoint and send_message read the endpoint table without a lock: an entry must
    # appear READY and with its connection, or a sender that finds it gets NOT_READY.
    published: list = []

    class WatchedTable(dict):
        def __setitem__(self, name, sfm_ep) -> None:
            published.append((name, sfm_ep.endpoint.state, len(sfm_ep.connections)))
            super().__setitem__(name, sfm_ep)

    manager.endpoints._endpoints = WatchedTable()
    connect(manager, RecordingConnection())
    assert published == [("site-1", EndpointState.READY, 1)]


def test_a_name_that_came_back_and_was_lost_again_is_told_disconnected(manager) -> None:
    # site-1 is told READY on X. X is lost, but its DISCONNECTED waits (here behind a slow
    # monitor call; with an event-loop driver, behind X's undelivered frames). site-1 comes
    # back on Y, so the waiting DISCONNECTED is dropped as stale; then Y is lost before its
    # READY is told. Monitors must still hear that site-1 is gone.
    x, y = RecordingConnection(), RecordingConnection()
    connect(manager, x)
    busy, done = threading.Event(), threading.Event()

    def slow_monitor_call() -> None:
        with manager.endpoints._telling:
            busy.set()
            done.wait(5)

    slow = threading.Thread(target=slow_monitor_call)
    slow.start()
    busy.wait(5)
    lose_x = in_thread(lose, manager, x, timeout=0.3)  # out of the tables; its DISCONNECTED waits

    def lose_y_before_ready_is_told() -> None:
        done.set()
        slow.join(5)
        lose_x.join(5)  # X's DISCONNECTED ran and found site-1 live again
        in_thread(lose, manager, y)

    y.on_ready = lose_y_before_ready_is_told
    try:
        connect(manager, y)
    finally:
        done.set()
    assert manager.find_endpoint("site-1") is None
    assert manager.log.events == [("site-1", EndpointState.READY), ("site-1", EndpointState.DISCONNECTED)]


def test_a_newer_connection_that_cannot_send_ready_does_not_replace_a_working_one(manager) -> None:
    old, new = RecordingConnection(), RecordingConnection()

    def broken() -> None:
        raise CommError(CommError.CLOSED, "the new connection broke")

    new.on_ready = broken
    connect(manager, old)
    connect(manager, new)  # the core logs the failed READY and goes on
    assert [c.conn for c in manager.get_connections("site-1")] == [old]
    assert old.state == ConnState.CONNECTED  # not closed as replaced
    lose(manager, new)
    assert manager.find_endpoint("site-1") is not None
    assert manager.log.events == [("site-1", EndpointState.READY)]


class TlsConnection(RecordingConnection):
    """A connection whose transport says its peer's certificate is for ``cn`` (mutual TLS)."""

    def __init__(self, cn: str | None, binding: bool = True) -> None:
        super().__init__()
        self.props = {"peer_addr": "10.0.0.9:4242", "peer_cn": cn, "identity_binding": binding}

    def get_conn_properties(self) -> dict:
        return self.props


@pytest.mark.parametrize("cn", ["site-2", "Site-1", None])
def test_a_peer_whose_certificate_is_for_another_name_is_refused_before_ready(manager, cn, caplog) -> None:
    conn = TlsConnection(cn)
    connect(manager, conn)  # site-1's HELLO
    assert conn.sent == []  # no READY: NVFlare sends READY first and checks after; we check first
    assert conn.state == ConnState.CLOSED
    assert manager.find_endpoint("site-1") is None and manager.log.events == []
    assert "refusing" in caplog.text and "'site-1'" in caplog.text and "10.0.0.9:4242" in caplog.text


def test_a_peer_whose_certificate_matches_its_name_is_admitted(manager) -> None:
    conn = TlsConnection("site-1")
    connect(manager, conn)
    assert conn.sent == [FrameType.READY]
    assert manager.find_endpoint("site-1").conn_props["peer_cn"] == "site-1"


def test_without_identity_binding_the_certificate_name_is_not_checked(manager) -> None:
    conn = TlsConnection("someone-else", binding=False)  # connection_security=tls or clear
    connect(manager, conn)
    assert conn.sent == [FrameType.READY]


def test_a_dead_peer_is_forgotten_at_once_even_if_its_driver_closes_slowly(manager) -> None:
    # The heartbeat declares the peer dead; the driver's close (here: never reported, as a
    # WebSocket close handshake with a vanished peer that waits out its close timeout) must
    # not keep a dead endpoint READY meanwhile.
    conn = RecordingConnection()
    connect(manager, conn)
    [sfm_conn] = manager.get_connections("site-1")
    later = sfm_conn.session.last_heard + manager.liveness.dead_timeout + 1
    manager._heartbeat.tick(sfm_conn, later)
    assert conn.state == ConnState.CLOSED  # asked to close
    assert manager.find_endpoint("site-1") is None
    assert manager.log.events == [("site-1", EndpointState.READY), ("site-1", EndpointState.DISCONNECTED)]
    lose(manager, conn)  # the driver's report, late: nothing more to tell
    assert manager.log.events[-1] == ("site-1", EndpointState.DISCONNECTED) and len(manager.log.events) == 2
