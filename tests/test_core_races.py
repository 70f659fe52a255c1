"""Races and orderings of the core's I/O shell, on in-memory driver connections (found in review)."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest
from helpers import StateLog, scaled, wait_until

from sfm_core import CommError, ConnManager, Endpoint, EndpointMonitor, EndpointState, MessageReceiver, Mode
from sfm_core.delivery import Dispatcher
from sfm_core.driver import Connection, ConnState, Driver
from sfm_core.frames import FrameType, decode_frame, encode_frame
from sfm_core.handshake import PeerHello, build_handshake
from sfm_core.session import Session, State


def hello(name: str = "site-1") -> bytes:
    return b"".join(encode_frame(FrameType.HELLO, 0, 1, None, build_handshake(name, {})))


def data(payload: bytes = b"x") -> bytes:
    return b"".join(encode_frame(FrameType.DATA, 1, 17, None, payload))


class FakeConn(Connection):
    """A driver connection in memory: keeps what is sent; ``inline`` picks the delivery path."""

    def __init__(self, inline: bool, props: dict | None = None, manager: ConnManager | None = None) -> None:
        super().__init__(None)
        self.inline_delivery = inline
        self.sent: list[bytes] = []
        self.props = props or {}
        self.manager = manager  # set: close() reports the loss at once, as a driver would

    def get_conn_properties(self) -> dict:
        return self.props

    def send_frame(self, frame) -> None:
        if self.state == ConnState.CLOSED:
            raise CommError(CommError.CLOSED, "closed")
        self.sent.append(b"".join(bytes(b) for b in frame))

    def close(self) -> None:
        if self.state != ConnState.CLOSED:
            self.state = ConnState.CLOSED
            if self.manager is not None:
                self.manager.state_change(self)

    def up(self, manager: ConnManager, name: str = "site-1") -> FakeConn:
        self.state = ConnState.CONNECTED
        manager.state_change(self)
        self.process_frames([hello(name)])
        return self

    def lost(self, manager: ConnManager) -> None:
        self.state = ConnState.CLOSED
        manager.state_change(self)


class Gate(MessageReceiver):
    """A receiver that blocks until ``open`` is set; ``entered`` says it is blocked."""

    def __init__(self) -> None:
        self.entered, self.open = threading.Event(), threading.Event()
        self.got: list[bytes] = []

    def process_message(self, endpoint, connection, app_id, message) -> None:
        self.entered.set()
        self.open.wait(scaled(10))
        self.got.append(bytes(message.payload or b""))


@pytest.fixture
def manager():
    m = ConnManager(Endpoint("srv"), linger=0)
    m.log = StateLog()
    m.add_endpoint_monitor(m.log)
    yield m
    m.stop(linger=0)


def test_a_protocol_error_behind_a_reported_loss_still_tells_disconnected(manager) -> None:
    """The loss is reported while a bad frame waits in the lane: DISCONNECTED is still told."""
    gate = Gate()
    manager.register_message_receiver(1, gate)
    manager.start()
    conn = FakeConn(inline=False).up(manager)
    wait_until(lambda: manager.log.events, what="READY")
    conn.process_frames([data()])
    assert gate.entered.wait(scaled(5))
    conn.process_frames([hello()])  # a second HELLO: a protocol error, queued behind the DATA
    conn.lost(manager)  # the driver reports the close meanwhile
    gate.open.set()
    wait_until(lambda: len(manager.log.events) == 2, what="DISCONNECTED")
    assert manager.log.events == [("site-1", EndpointState.READY), ("site-1", EndpointState.DISCONNECTED)]
    FakeConn(inline=True).up(manager)  # the name comes back: monitors hear READY again
    assert manager.log.events[-1] == ("site-1", EndpointState.READY)


def test_stop_delivers_what_was_received_before_it(manager, caplog) -> None:
    """stop() lets the lane deliver its backlog (more than one batch) before the loss is told."""
    order: list = []

    class Slow(MessageReceiver):
        def process_message(self, *args) -> None:
            time.sleep(0.001)
            order.append("msg")

    class Log(EndpointMonitor):
        def state_change(self, endpoint) -> None:
            order.append(endpoint.state)

    manager.register_message_receiver(1, Slow())
    manager.add_endpoint_monitor(Log())
    manager.start()
    conn = FakeConn(inline=False, manager=manager).up(manager)
    wait_until(lambda: order, what="READY")
    conn.process_frames([data()] * 600)
    with caplog.at_level(logging.WARNING):
        manager.stop(linger=0)
    assert order.count("msg") == 600
    assert order[-1] == EndpointState.DISCONNECTED
    assert "after the session closed" not in caplog.text


def test_the_dispatcher_stops_only_after_lanes_with_several_batches() -> None:
    """A lane re-queued behind the stop (over 256 items left) is still drained, and its finish runs."""
    d = Dispatcher(workers=2)
    handled: list = []
    finished = threading.Event()
    lane = d.lane(handled.append, max_items=10_000)
    lane.submit([b"x"] * 600)
    lane.finish(finished.set)
    d.start()
    d.stop()
    assert len(handled) == 600 and finished.is_set()


def test_a_monitor_may_stop_the_manager_when_a_dead_peer_is_told(tmp_path) -> None:
    """A dead TCP peer is told on a delivery thread; a monitor that calls stop() there ends cleanly."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    accepted: list = []

    def frozen_server() -> None:  # answers HELLO with READY, then says nothing
        s, _ = ls.accept()
        accepted.append(s)
        s.recv(65536)
        s.sendall(b"".join(encode_frame(FrameType.READY, 0, 1, None, build_handshake("server", {}))))

    t = threading.Thread(target=frozen_server)
    t.start()
    cm = ConnManager(Endpoint("site-1"), heartbeat_interval=scaled(0.2), heartbeat_check=scaled(0.05), dead_after=2)
    stopped = threading.Event()
    errors: list = []

    class StopOnLoss(EndpointMonitor):
        def state_change(self, endpoint) -> None:
            if endpoint.state == EndpointState.DISCONNECTED:
                try:
                    cm.stop(linger=0)
                except Exception as e:
                    errors.append(e)
                stopped.set()

    cm.add_endpoint_monitor(StopOnLoss())
    cm.add_connector(f"tcp://127.0.0.1:{ls.getsockname()[1]}", {}, Mode.ACTIVE)
    try:
        cm.start()
        assert stopped.wait(scaled(10)), "the dead peer was never told"
        assert errors == []
    finally:
        cm.stop(linger=0)
        t.join(scaled(5))
        for s in accepted:
            s.close()
        ls.close()
    wait_until(lambda: not [x for x in threading.enumerate() if x.name.startswith("sfm-")], what="threads gone")


def test_monitors_see_the_state_that_was_decided(manager) -> None:
    """A READY told while the endpoint is lost meanwhile reads as READY to every monitor."""
    busy, go = threading.Event(), threading.Event()

    class Slow(EndpointMonitor):
        def state_change(self, endpoint) -> None:
            if endpoint.state == EndpointState.READY:
                busy.set()
                go.wait(scaled(5))

    second = StateLog()
    manager.monitors.insert(0, Slow())
    manager.add_endpoint_monitor(second)
    conn = FakeConn(inline=True)
    t = threading.Thread(target=conn.up, args=(manager,))
    t.start()
    assert busy.wait(scaled(5))  # READY is being told; the first monitor is slow
    conn.lost(manager)  # the endpoint goes meanwhile
    go.set()
    t.join(scaled(5))
    assert second.events == [("site-1", EndpointState.READY), ("site-1", EndpointState.DISCONNECTED)]


def test_update_endpoint_makes_the_endpoint_usable(manager) -> None:
    """The seed method records the peer and opens the connection: sends to it work."""
    conn = FakeConn(inline=True)
    conn.state = ConnState.CONNECTED
    manager.state_change(conn)
    [sfm_conn] = manager.sfm_conns.values()
    manager.update_endpoint(sfm_conn, {"endpoint_name": "site-1", "role": "x"})
    ep = manager.find_endpoint("site-1")
    assert ep.state == EndpointState.READY and ep.properties == {"role": "x"}
    manager.send_message(ep, 1, None, b"hi")
    assert decode_frame(conn.sent[-1]).type == FrameType.DATA


def test_a_connection_without_the_certificate_cannot_take_over_a_bound_endpoint(manager, caplog) -> None:
    """A plain connection claiming a name held by a certificate-bound one is refused; the bound one stays."""
    good = FakeConn(inline=True, props={"peer_cn": "site-1", "identity_binding": True}).up(manager)
    evil = FakeConn(inline=True).up(manager)
    assert [c.conn for c in manager.get_connections("site-1")] == [good]
    assert good.state == ConnState.CONNECTED and evil.state == ConnState.CLOSED
    assert "may not take it over" in caplog.text
    manager.send_message(manager.find_endpoint("site-1"), 1, None, b"secret")
    assert not any(decode_frame(f).type == FrameType.DATA for f in evil.sent)


def test_reload_tls_tries_every_connector_and_names_each_failure(manager) -> None:
    """One connector's bad files do not keep the others from reloading."""
    reloaded: list = []

    class D(Driver):
        def __init__(self, ok: bool) -> None:
            super().__init__()
            self.ok = ok

        @staticmethod
        def supported_transports() -> list[str]:
            return ["fake"]

        @staticmethod
        def capabilities() -> dict:
            return {"tls": True}

        def listen(self, connector) -> None: ...

        def connect(self, connector) -> None: ...

        def reload_tls(self) -> None:
            if not self.ok:
                raise CommError(CommError.BAD_CONFIG, "server_key='k.pem' cannot be read")
            reloaded.append(self)

    bad, good = D(False), D(True)
    manager.add_connector(bad, {"url": "fake://a"}, Mode.PASSIVE)
    manager.add_connector(good, {"url": "fake://b"}, Mode.PASSIVE)
    with pytest.raises(CommError, match=r"fake://a.*cannot be read"):
        manager.reload_tls()
    assert reloaded == [good]


def test_a_heartbeat_check_period_must_be_positive() -> None:
    """heartbeat_check <= 0 would spin the timer thread: refused."""
    with pytest.raises(CommError, match="heartbeat_check must be > 0"):
        ConnManager(Endpoint("x"), heartbeat_check=-1)


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"endpoint_name": "site-1", "sfm_max_frame_size": "big"}, "sfm_max_frame_size"),
        ({"role": "x"}, "endpoint_name"),
        ({"endpoint_name": "a.a"}, "a.a"),
    ],
)
def test_update_endpoint_refuses_a_bad_map_naming_what_is_wrong(manager, data, named) -> None:
    """Found by fuzzing: a non-integer frame limit reached the session as a TypeError."""
    conn = FakeConn(inline=True)
    conn.state = ConnState.CONNECTED
    manager.state_change(conn)
    [sfm_conn] = manager.sfm_conns.values()
    with pytest.raises(CommError) as err:
        manager.update_endpoint(sfm_conn, data)
    assert err.value.code == CommError.BAD_DATA and named in err.value.message
    assert manager.find_endpoint("site-1") is None


def test_adopt_never_reopens_a_closed_or_closing_session() -> None:
    """Found by fuzzing: adopt() after connection_lost() set the state back to OPEN."""
    peer = PeerHello("site-1", {}, frozenset())
    closed = Session("server", None, active=False, now=0.0)
    closed.connection_lost("gone")
    closing = Session("server", None, active=False, now=0.0)
    closing.adopt(peer)
    closing.begin_close()
    for session, state in ((closed, State.CLOSED), (closing, State.CLOSING)):
        with pytest.raises(CommError) as err:
            session.adopt(peer)
        assert err.value.code == CommError.CLOSED
        assert session.state is state


def test_a_second_adopt_brings_its_own_frame_limit() -> None:
    """A peer adopted later without the frame-limit extension is not held to the first one's."""
    session = Session("server", None, active=False, now=0.0, extensions=["frame-limit"])
    session.adopt(PeerHello("site-1", {}, frozenset({"frame-limit"}), 1000))
    assert session.send_limit == 1000
    session.adopt(PeerHello("site-1", {}, frozenset()))
    assert session.send_limit == session.max_frame_size


def test_update_endpoint_takes_the_connection_out_of_max_handshakes(manager) -> None:
    """Review finding: only a HELLO answered with READY left the handshake count, so 256
    connections opened with update_endpoint filled a listener's max_handshakes for good."""
    from sfm_core.limits import ListenerLimits

    limits = ListenerLimits(max_connections=10, max_handshakes=1)
    conn = FakeConn(inline=True)
    conn.slot = limits.admit("peer")
    conn.state = ConnState.CONNECTED
    manager.state_change(conn)
    [sfm_conn] = manager.sfm_conns.values()
    assert limits.handshaking == 1
    manager.update_endpoint(sfm_conn, {"endpoint_name": "site-1"})
    assert (limits.connections, limits.handshaking) == (1, 0)
    assert limits.admit("next") is not None
