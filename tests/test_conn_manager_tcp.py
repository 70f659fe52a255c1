"""ConnManager over the real TCP driver: handshake, messages, monitors, heartbeats, errors."""

from __future__ import annotations

import socket
import sys
import threading
import time

import psutil
import pytest
from helpers import Collector, RawPeer, StateLog, scaled, unread_bytes, wait_ready, wait_until

from sfm_core import (
    CommError,
    ConnManager,
    Endpoint,
    EndpointState,
    FrameType,
    Mode,
    get_plugin_manager,
    hookimpl,
)
from sfm_core.frames import PREFIX


@pytest.fixture
def managers():
    """Factory for started-later ConnManagers; every one is stopped at teardown."""
    made: list[ConnManager] = []

    def make(name: str, properties: dict | None = None, **kwargs) -> ConnManager:
        m = ConnManager(Endpoint(name, properties), **kwargs)
        made.append(m)
        return m

    yield make
    for m in made:
        m.stop()


def listen(manager: ConnManager, url: str = "tcp://127.0.0.1:0") -> str:
    handle = manager.add_connector(url, {}, Mode.PASSIVE)
    manager.start()
    return manager.wait_listening(handle, scaled(5))


def server_url(manager: ConnManager) -> str:
    """The URL of a manager's (only) listener."""
    return next(iter(manager.connectors.values())).url


def pair(managers, server_kw: dict | None = None, client_kw: dict | None = None):
    server = managers("server", {"role": "server"}, **(server_kw or {}))
    client = managers("site-1", {"role": "client", "n": 1}, **(client_kw or {}))
    url = listen(server)
    client.add_connector(url, {}, Mode.ACTIVE)
    client.start()
    return server, client, wait_ready(client, "server"), wait_ready(server, "site-1")


def test_handshake_exchanges_names_properties_and_connection_details(managers) -> None:
    server, client, to_server, to_client = pair(managers)
    assert to_server.properties["role"] == "server"
    assert to_client.properties["role"] == "client" and to_client.properties["n"] == 1
    assert "endpoint_name" not in to_client.properties
    assert to_client.conn_props["peer_addr"].startswith("127.0.0.1:")
    assert to_client.conn_props["local_addr"] == server_url(server).removeprefix("tcp://")
    assert [c.conn.name for c in client.get_connections("server")] != []
    assert client.get_connections("nobody") is None


def test_messages_both_ways_with_all_header_types_and_payload_types(managers) -> None:
    server, client, to_server, to_client = pair(managers)
    got_s, got_c = Collector(), Collector()
    server.register_message_receiver(5, got_s)
    client.register_message_receiver(5, got_c)
    headers = {"s": "str", "i": -7, "b": b"\x00\xff", "l": [1, "a", b"z"], "d": {"k": [1, 2]}}
    client.send_message(to_server, 5, headers, b"bytes")
    client.send_message(to_server, 5, None, bytearray(b"bytearray"))
    client.send_message(to_server, 5, {}, memoryview(b"view"))
    client.send_message(to_server, 5, None, [b"li", bytearray(b"st"), memoryview(b"!")])
    client.send_message(to_server, 5, None, b"")
    client.send_message(to_server, 5, None, None)
    server.send_message(to_client, 5, headers, b"back")
    msgs = got_s.wait_for(6)
    assert [(m[2], m[3]) for m in msgs] == [
        (headers, b"bytes"),
        (None, b"bytearray"),
        (None, b"view"),
        (None, b"list!"),
        (None, None),  # no bytes on the wire means None, as in the original
        (None, None),
    ]
    assert {m[4] for m in msgs if m[3] is not None} == {memoryview}  # one payload type on every driver
    assert got_c.wait_for(1)[0][:4] == ("server", 5, headers, b"back")


def test_order_is_kept_per_connection_and_nothing_is_lost(managers) -> None:
    server, client, to_server, _ = pair(managers)
    got = Collector()
    server.register_message_receiver(1, got)
    n = 20_000
    for i in range(n):
        client.send_message(to_server, 1, None, i.to_bytes(4, "big"))
    msgs = got.wait_for(n, timeout=30)
    assert [int.from_bytes(m[3], "big") for m in msgs] == list(range(n))


def test_large_messages_both_ways(managers) -> None:
    server, client, to_server, to_client = pair(managers)
    got_s, got_c = Collector(), Collector()
    server.register_message_receiver(1, got_s)
    client.register_message_receiver(1, got_c)
    big = bytes(range(256)) * (40 * 1024 + 7)  # ~10 MiB, not a multiple of any buffer size
    client.send_message(to_server, 1, {"n": 1}, big)
    server.send_message(to_client, 1, {"n": 2}, memoryview(big)[1:])
    assert got_s.wait_for(1)[0][3] == big
    assert got_c.wait_for(1)[0][3] == big[1:]


def test_concurrent_senders_are_thread_safe(managers) -> None:
    server, client, to_server, _ = pair(managers)
    got = Collector()
    server.register_message_receiver(1, got)
    per_thread = 2000

    def send(tag: int) -> None:
        for i in range(per_thread):
            client.send_message(to_server, 1, {"t": tag}, i.to_bytes(4, "big"))

    threads = [threading.Thread(target=send, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    msgs = got.wait_for(4 * per_thread, timeout=30)
    for tag in range(4):
        seq = [int.from_bytes(m[3], "big") for m in msgs if m[2]["t"] == tag]
        assert seq == list(range(per_thread))  # each sender's order survives


def test_loopback_message_to_ourselves(managers) -> None:
    m = managers("solo")
    got = Collector()
    m.register_message_receiver(3, got)
    m.start()
    me = m.find_endpoint("solo")
    m.send_message(me, 3, {"a": 1}, [b"lo", b"op"])
    m.send_message(me, 3, None, b"")
    assert [x[:4] for x in got.wait_for(2)] == [("solo", 3, {"a": 1}, b"loop"), ("solo", 3, None, None)]


def test_endpoint_monitors_and_plugin_hooks_see_ready_and_disconnected(managers) -> None:
    events: list = []

    class Observer:
        @hookimpl
        def sfm_endpoint_state_changed(self, manager, endpoint) -> None:
            events.append(("endpoint", manager.local_endpoint.name, endpoint.name, endpoint.state))

        @hookimpl
        def sfm_connection_state_changed(self, manager, connection) -> None:
            events.append(("conn", manager.local_endpoint.name, connection.state.value))

    observer = Observer()
    get_plugin_manager().register(observer)
    try:
        server = managers("server")
        log = StateLog()
        server.add_endpoint_monitor(log)
        url = listen(server)
        client = managers("site-1")
        client.add_connector(url, {}, Mode.ACTIVE)
        client.start()
        wait_ready(server, "site-1")
        client.stop()
        wait_until(lambda: ("site-1", EndpointState.DISCONNECTED) in log.events, what="DISCONNECTED")
        assert log.events == [("site-1", EndpointState.READY), ("site-1", EndpointState.DISCONNECTED)]
        assert server.find_endpoint("site-1") is None
        assert ("endpoint", "server", "site-1", EndpointState.READY) in events
        assert ("conn", "server", "connected") in events and ("conn", "server", "closed") in events
    finally:
        get_plugin_manager().unregister(observer)


def test_active_connector_reconnects_after_the_server_comes_back(managers) -> None:
    server = managers("server")
    url = listen(server)
    port = int(url.rsplit(":", 1)[1])
    client = managers("site-1", reconnect_min=0.05, reconnect_max=0.2)
    client.add_connector(url, {}, Mode.ACTIVE)
    client.start()
    wait_ready(client, "server")
    server.stop()
    wait_until(lambda: client.find_endpoint("server") is None, what="server gone")
    server2 = managers("server")
    listen(server2, f"tcp://127.0.0.1:{port}")
    ep = wait_ready(client, "server", timeout=10)
    got = Collector()
    server2.register_message_receiver(1, got)
    client.send_message(ep, 1, None, b"again")
    assert got.wait_for(1)[0][3] == b"again"


def test_passive_side_serves_many_connections_at_once(managers) -> None:
    server = managers("server")
    got = Collector()
    server.register_message_receiver(1, got)
    url = listen(server)
    clients = []
    for i in range(20):
        c = managers(f"site-{i}")
        c.add_connector(url, {}, Mode.ACTIVE)
        c.start()
        clients.append(c)
    for c in clients:
        c.send_message(wait_ready(c, "server"), 1, None, c.local_endpoint.name.encode())
    names = {m[3] for m in got.wait_for(20)}
    assert names == {f"site-{i}".encode() for i in range(20)}
    assert len(server.endpoints) == 20


def test_remove_endpoint_and_remove_connector(managers) -> None:
    server = managers("server")
    handle = server.add_connector("tcp://127.0.0.1:0", {}, Mode.PASSIVE)
    server.start()
    url = server.wait_listening(handle, scaled(10))
    # No reconnect before the removal has been seen (the wait below is scaled too).
    client = managers("site-1", reconnect_min=scaled(5), reconnect_max=scaled(5))
    client.add_connector(url, {}, Mode.ACTIVE)
    client.start()
    wait_ready(server, "site-1")
    server.remove_endpoint("site-1")
    wait_until(lambda: server.find_endpoint("site-1") is None, what="endpoint removed")
    server.remove_connector(handle)
    with pytest.raises(CommError, match="no connector with handle"):
        server.get_connector(handle)


def test_send_errors_name_the_endpoint(managers) -> None:
    m = managers("site-1")
    m.start()
    with pytest.raises(CommError, match="no connection to endpoint 'ghost'") as err:
        m.send_message(Endpoint("ghost"), 1, None, b"x")
    assert err.value.code == CommError.CLOSED


def test_headers_too_large_raise_before_anything_is_sent(managers) -> None:
    server, client, to_server, _ = pair(managers)
    got = Collector()
    server.register_message_receiver(1, got)
    with pytest.raises(CommError, match="limit is 65535") as err:
        client.send_message(to_server, 1, {"h": "x" * 70_000}, b"")
    assert err.value.code == CommError.BAD_DATA
    client.send_message(to_server, 1, None, b"still fine")
    assert got.wait_for(1)[0][3] == b"still fine"


def test_message_over_the_configured_maximum_is_refused(managers) -> None:
    server, client, to_server, _ = pair(managers, client_kw={"max_frame_size": 1024})
    with pytest.raises(CommError, match="exceeds the maximum frame size of 1024"):
        client.send_message(to_server, 1, None, b"x" * 2000)


def test_heartbeats_keep_a_quiet_connection_alive(managers) -> None:
    # Only the client's heartbeat is fast, so it is the one that must PING, and the
    # server's PONGs are all that keeps its connection from looking dead.
    fast = {"heartbeat_interval": 0.2, "heartbeat_check": 0.05}
    server, client, to_server, _ = pair(managers, server_kw={"heartbeat_interval": 30}, client_kw=fast)
    conn = client.get_connections("server")[0]
    # Several dead_after periods (0.6 s) of silence from the application, PONGs only.
    wait_until(lambda: conn.session.pongs_received >= 10, timeout=10, what="10 PONGs")
    assert client.get_connections("server")[0] is conn  # still the same, live connection
    assert conn.session.pings_sent >= 10


def test_a_silent_peer_is_closed_as_dead(managers) -> None:
    server = managers("server", heartbeat_interval=0.2, heartbeat_check=0.05, dead_after=3)
    url = listen(server)
    with RawPeer(url) as peer:
        peer.hello("mute")
        assert peer.read_frame().type == FrameType.READY
        wait_ready(server, "mute")
        # The peer answers no PING: after 3 silent intervals the server closes it.
        assert peer.is_closed_by_peer(timeout=5)
    wait_until(lambda: server.find_endpoint("mute") is None, what="dead peer removed")


def test_a_peer_that_never_handshakes_is_closed(managers) -> None:
    server = managers("server", handshake_timeout=0.3, heartbeat_check=0.05)
    url = listen(server)
    with RawPeer(url) as peer:
        assert peer.is_closed_by_peer(timeout=5)


def test_ping_is_answered_with_pong(managers) -> None:
    server = managers("server")
    url = listen(server)
    with RawPeer(url) as peer:
        peer.handshake("pinger")
        peer.send_frame(FrameType.PING, stream_id=17, payload=b"\xc0", sequence=2)
        pong = peer.read_frame()
        assert pong.type == FrameType.PONG and bytes(pong.payload) == b"\xc0"


@pytest.mark.parametrize(
    ("bad", "what"),
    [
        (PREFIX.pack(10, 0, 1, 0, 0, 1, 17, 2), "length below 16"),
        (PREFIX.pack(2**31 - 1, 0, 1, 0, 0, 1, 17, 2), "length above the maximum"),
        (PREFIX.pack(20, 9, 1, 0, 0, 1, 17, 2) + b"\0" * 4, "header_len beyond the frame"),
        (PREFIX.pack(18, 2, 1, 0, 0, 1, 17, 2) + b"\xc1\xc1", "headers that are not msgpack"),
    ],
)
def test_a_malformed_frame_closes_only_that_connection(managers, bad: bytes, what: str) -> None:
    server, client, to_server, _ = pair(managers)
    got = Collector()
    server.register_message_receiver(1, got)
    with RawPeer(server_url(server)) as peer:
        peer.handshake("vandal")
        peer.send(bad)
        assert peer.is_closed_by_peer(), what
    client.send_message(to_server, 1, None, b"unaffected")  # the good connection keeps working
    assert got.wait_for(1)[0][3] == b"unaffected"
    # The peer may see the close before the pool thread has released the connection.
    wait_until(lambda: server.find_endpoint("vandal") is None, what="vandal forgotten")


@pytest.mark.parametrize(
    ("hello", "what"),
    [
        ({"timestamp": 1.0}, "no endpoint_name"),
        ({"endpoint_name": "server"}, "our own name"),
    ],
)
def test_a_bad_handshake_is_refused_and_others_go_on(managers, hello: dict, what: str) -> None:
    import msgpack

    server, client, to_server, _ = pair(managers)
    with RawPeer(server_url(server)) as peer:
        peer.send_frame(FrameType.HELLO, payload=msgpack.packb(hello))
        assert peer.is_closed_by_peer(), what
    assert wait_ready(client, "server") is to_server


def test_data_before_handshake_closes_the_connection(managers) -> None:
    server = managers("server")
    url = listen(server)
    with RawPeer(url) as peer:
        peer.send_frame(FrameType.DATA, app_id=1, stream_id=17, payload=b"early")
        assert peer.is_closed_by_peer()


def test_a_peer_that_vanishes_mid_frame_affects_only_its_connection(managers, caplog) -> None:
    server, client, to_server, _ = pair(managers)
    got = Collector()
    server.register_message_receiver(1, got)
    with RawPeer(server_url(server)) as peer:
        peer.handshake("flaky")
        wait_ready(server, "flaky")
        frame = PREFIX.pack(16 + 1000, 0, 1, 0, 0, 1, 17, 2) + b"x" * 300
        peer.send(frame)  # 300 of 1000 payload bytes, then gone
    wait_until(lambda: server.find_endpoint("flaky") is None, what="flaky removed")
    assert "closed in the middle of a frame" in caplog.text
    client.send_message(to_server, 1, None, b"ok")
    assert [m[3] for m in got.wait_for(1)] == [b"ok"]  # the half frame was never delivered


def test_unknown_scheme_and_bad_config_are_clear(managers) -> None:
    m = managers("site-1")
    with pytest.raises(CommError, match="no driver for scheme 'nosuch'") as err:
        m.add_connector("nosuch://host:1", {}, Mode.ACTIVE)
    assert err.value.code == CommError.NOT_SUPPORTED
    with pytest.raises(CommError, match="not a connector URL"):
        m.add_connector("tcp:/oops", {}, Mode.ACTIVE)
    with pytest.raises(CommError, match="invalid endpoint name"):
        ConnManager(Endpoint("bad name"))


def test_listening_on_a_busy_port_reports_the_error(managers) -> None:
    first = managers("server")
    url = listen(first)
    second = managers("other")
    handle = second.add_connector(url, {}, Mode.PASSIVE)
    second.start()
    with pytest.raises(CommError, match="cannot listen on 127.0.0.1"):
        second.wait_listening(handle, scaled(5))


def test_slow_receiver_slows_the_sender_instead_of_growing_memory(managers) -> None:
    server, client, to_server, _ = pair(managers, server_kw={"queue_frames": 4, "queue_bytes": 1 << 20})
    got = Collector()
    got.gate = threading.Event()  # the receiver is stuck until we open the gate
    server.register_message_receiver(1, got)
    chunk = b"x" * (256 * 1024)
    sent = []

    def sender() -> None:
        for i in range(400):  # 100 MiB in all: far more than socket buffers and queues hold
            client.send_message(to_server, 1, {"i": i}, chunk)
            sent.append(i)

    t = threading.Thread(target=sender)
    t.start()

    def held_back() -> bool:
        before = len(sent)
        time.sleep(scaled(0.25))  # a window in which an unchecked sender sends dozens
        return t.is_alive() and len(sent) == before

    # Unchecked, all 400 go out and the sender ends. Held back, it stops (alive) once the
    # kernel's socket buffers and the 1 MiB receive queue are full: a few MiB.
    wait_until(held_back, timeout=10, what="the sender to be held back (alive, sending nothing more)")
    assert len(sent) < 80, f"sender was not held back ({len(sent)} of 400 sent)"
    got.gate.set()
    t.join(scaled(30))
    msgs = got.wait_for(400, timeout=30)
    assert [m[2]["i"] for m in msgs] == list(range(400))


def test_stop_closes_everything_and_is_idempotent(managers) -> None:
    server, client, *_ = pair(managers)
    client.stop()
    server.stop()
    server.stop()
    with pytest.raises(CommError, match="stopped"):
        server.add_connector("tcp://127.0.0.1:0", {}, Mode.PASSIVE)


def test_a_slow_receiver_holds_only_its_own_connection(managers) -> None:
    server = managers("server")
    gate = threading.Event()
    fast_got: list[bytes] = []

    class Router(Collector):
        def process_message(self, endpoint, connection, app_id, message) -> None:
            if endpoint.name == "slow":
                gate.wait(scaled(30))  # this receiver is stuck ...
            else:
                fast_got.append(bytes(message.payload))

    server.register_message_receiver(1, Router())
    url = listen(server)
    slow, fast = managers("slow"), managers("fast")
    for c in (slow, fast):
        c.add_connector(url, {}, Mode.ACTIVE)
        c.start()
    slow.send_message(wait_ready(slow, "server"), 1, None, b"stuck")
    to_server = wait_ready(fast, "server")
    for i in range(100):
        fast.send_message(to_server, 1, None, b"%d" % i)
    # ... while the other connection of the same listener is served in full.
    wait_until(lambda: len(fast_got) == 100, what="fast messages")
    assert fast_got == [b"%d" % i for i in range(100)]
    gate.set()


def test_a_send_that_times_out_half_way_closes_the_connection_and_corrupts_nothing(managers) -> None:
    server = managers("server")
    entered = threading.Event()

    class Stuck(Collector):
        def process_message(self, endpoint, connection, app_id, message) -> None:
            entered.set()
            super().process_message(endpoint, connection, app_id, message)

    got = Stuck()
    got.gate = threading.Event()  # the server's receiver is stuck: nothing is read
    server.register_message_receiver(1, got)
    url = listen(server)
    client = managers("site-1", reconnect_min=0.05, reconnect_max=0.2)
    client.add_connector(url + "?send_timeout=0.5", {}, Mode.ACTIVE)
    client.start()
    to_server = wait_ready(client, "server")
    client.send_message(to_server, 1, None, b"first")  # holds the server's receiver
    # Only once the receiver is stuck in it does the server stop reading: before that, a
    # busy machine's reader could take "first" and the whole big frame in one go.
    assert entered.wait(scaled(10))
    [first_conn] = client.get_connections("server")
    with pytest.raises(CommError, match="peer took nothing for 0.5 s") as err:
        client.send_message(to_server, 1, None, b"x" * (64 << 20))  # more than the buffers take
    assert err.value.code == CommError.TIMEOUT
    got.gate.set()
    # Part of that frame went out, so the connection was closed; a new one carries on.
    wait_until(lambda: client.get_connections("server") != [first_conn], timeout=10, what="old connection closed")
    client.send_message(client.wait_for_endpoint("server", timeout=scaled(10)), 1, None, b"after")
    msgs = got.wait_for(2)
    assert [m[3] for m in msgs] == [b"first", b"after"]  # the cut frame never became a message


def _read_by_server(peer: RawPeer) -> bool:
    """True once the server (in this process) has read everything ``peer`` sent it."""
    me = peer.sock.getsockname()
    fds = [c.fd for c in psutil.Process().net_connections("tcp") if c.raddr == me and c.fd != -1]
    return bool(fds) and unread_bytes(fds[0]) == 0


def test_a_prefix_claiming_a_huge_frame_commits_no_memory(managers) -> None:
    server = managers("server")
    url = listen(server)
    rss = psutil.Process().memory_info().rss
    peers = [RawPeer(url) for _ in range(4)]
    try:
        for i, peer in enumerate(peers):
            peer.handshake(f"greedy-{i}")
            peer.send(PREFIX.pack(1 << 30, 0, 1, 0, 0, 1, 17, 2) + b"x" * 16)  # "1 GiB follows"
        for peer in peers:
            wait_until(lambda peer=peer: _read_by_server(peer), what="the server to read the huge prefix")
        time.sleep(scaled(0.5))  # time for a buffer sized from the prefix to be touched, if it were
        grown = psutil.Process().memory_info().rss - rss
        assert grown < 64 << 20, f"RSS grew by {grown >> 20} MiB for 4 x 32 bytes"
    finally:
        for peer in peers:
            peer.close()


def test_two_peers_replying_large_messages_to_each_other_do_not_deadlock(managers) -> None:
    # Each receiver answers a request with 32 MiB on the same connection, both at once:
    # with delivery on the reading thread, both reading threads are busy sending, so each
    # keeps reading while it waits for the socket to drain.
    fast = {"reconnect_min": 5.0}
    server, client, to_server, to_client = pair(managers, client_kw=fast)
    done: dict[str, str] = {}
    big = b"r" * (32 << 20)
    sinks = {"server": Collector(), "site-1": Collector()}

    class Replier(Collector):
        def __init__(self, manager: ConnManager) -> None:
            super().__init__()
            self.manager = manager

        def process_message(self, endpoint, connection, app_id, message) -> None:
            try:
                self.manager.send_message(endpoint, 2, None, big)
                done[self.manager.local_endpoint.name] = "ok"
            except CommError as e:
                done[self.manager.local_endpoint.name] = str(e)

    for m in (server, client):
        m.register_message_receiver(1, Replier(m))
        m.register_message_receiver(2, sinks[m.local_endpoint.name])
    server.send_message(to_client, 1, None, b"request")
    client.send_message(to_server, 1, None, b"request")
    wait_until(lambda: len(done) == 2, timeout=30, what="both replies sent")
    assert done == {"server": "ok", "site-1": "ok"}
    for sink in sinks.values():
        assert sink.wait_for(1, timeout=30)[0][3] == big


def test_heartbeat_checks_go_on_while_a_sender_is_blocked(managers) -> None:
    server = managers("server", handshake_timeout=0.5, heartbeat_interval=0.2, heartbeat_check=0.05)
    got = Collector()
    got.gate = threading.Event()
    server.register_message_receiver(1, got)
    url = listen(server)
    with RawPeer(url) as slow:
        slow.handshake("sink")  # handshakes, then never reads: the server's sends to it block
        to_sink = wait_ready(server, "sink")
        blocked = threading.Thread(target=lambda: _swallow(server.send_message, to_sink, 1, None, b"x" * (64 << 20)))
        blocked.start()
        # 64 MiB cannot fit in the socket buffers: once some arrived, the send is stuck.
        wait_until(lambda: unread_bytes(slow.sock) > 0, what="the send to the sink to start")
        assert blocked.is_alive()
        with RawPeer(url) as mute:  # never handshakes: must still be closed on time
            assert mute.is_closed_by_peer(timeout=2.0)
    server.stop()
    blocked.join(scaled(10))


def _swallow(fn, *args) -> None:
    try:
        fn(*args)
    except CommError:
        pass


def test_a_second_connection_with_the_same_name_replaces_the_first(managers) -> None:
    server = managers("server")
    log = StateLog()
    server.add_endpoint_monitor(log)
    url = listen(server)
    with RawPeer(url) as old, RawPeer(url) as new:
        old.handshake("site-9")
        new.handshake("site-9")
        assert old.is_closed_by_peer()  # as NVFlare does: the newer connection wins
        assert server.get_connections("site-9")[0].conn.get_conn_properties()["peer_addr"] == (
            "{}:{}".format(*new.sock.getsockname())
        )
    wait_until(lambda: server.find_endpoint("site-9") is None, what="gone")
    assert log.events == [("site-9", EndpointState.READY), ("site-9", EndpointState.DISCONNECTED)]


def test_a_peer_that_has_ready_is_already_known(managers) -> None:
    # READY used to go out before the endpoint was recorded: a peer (or a second connection
    # with its name) acting at once raced the server's bookkeeping.
    server = managers("server")
    url = listen(server)
    for i in range(30):
        with RawPeer(url) as peer:
            peer.handshake(f"site-{i}")
            assert server.find_endpoint(f"site-{i}") is not None, f"site-{i} has READY but is unknown"


def test_a_message_sent_the_moment_a_peer_is_known_follows_ready(managers) -> None:
    server = managers("server")
    url = listen(server)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # let the eager sender into any gap between record and READY
    try:
        _eager_senders(server, url)
    finally:
        sys.setswitchinterval(switch)


def _eager_senders(server: ConnManager, url: str) -> None:
    for i in range(50):
        name = f"eager-{i}"
        stop = threading.Event()
        errors: list[CommError] = []

        def send_when_known(name: str = name, stop: threading.Event = stop, errors: list = errors) -> None:
            while not stop.is_set():
                ep = server.find_endpoint(name)
                if ep is not None:
                    try:
                        server.send_message(ep, 7, None, b"first")
                    except CommError as e:  # a known endpoint must take messages at once
                        errors.append(e)
                    return

        sender = threading.Thread(target=send_when_known)
        sender.start()
        try:
            with RawPeer(url) as peer:
                peer.hello(name)
                # Generous timeouts: with a tiny switch interval, a busy machine crawls.
                assert peer.read_frame(timeout=20).type == FrameType.READY
                sender.join(scaled(20))
                assert not errors, errors[0]
                assert peer.read_frame(timeout=20).payload == b"first"
        finally:
            stop.set()
            sender.join(scaled(5))


def test_non_byte_memoryview_payloads_are_sent_whole(managers) -> None:
    import array

    server, client, to_server, _ = pair(managers)
    got = Collector()
    server.register_message_receiver(1, got)
    ints = array.array("i", range(5000))
    client.send_message(to_server, 1, None, memoryview(ints))
    client.send_message(to_server, 1, None, [memoryview(ints)[:10], b"!"])
    msgs = got.wait_for(2)
    assert msgs[0][3] == ints.tobytes()
    assert msgs[1][3] == ints[:10].tobytes() + b"!"


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("send_timeout=soon", "send_timeout='soon' is not a float"),
        ("gather_us=-5", "gather_us"),
        ("io_threads=0", "io_threads"),
    ],
)
def test_bad_driver_params_are_reported_by_name(managers, query: str, error: str) -> None:
    # At add_connector, to the caller: not later, logged from a connector thread.
    m = managers("server")
    with pytest.raises(CommError, match=error) as err:
        m.add_connector(f"tcp://127.0.0.1:0?{query}", {}, Mode.PASSIVE)
    assert err.value.code == CommError.BAD_CONFIG
    assert not m.connectors


@pytest.mark.parametrize("gather_us", [0, 50, 2000])
def test_a_stream_arrives_whole_and_in_order_whatever_the_gather_wait(managers, gather_us: int) -> None:
    server = managers("server")
    got = Collector()
    server.register_message_receiver(1, got)
    url = listen(server, f"tcp://127.0.0.1:0?gather_us={gather_us}")
    client = managers("site-1")
    client.add_connector(url, {}, Mode.ACTIVE)
    client.start()
    to_server = wait_ready(client, "server")
    for i in range(3000):
        client.send_message(to_server, 1, None, i.to_bytes(4, "big"))
        if i % 500 == 0:
            time.sleep(0.01)  # pauses: the stream runs dry now and then, mid-gather
    assert [int.from_bytes(m[3], "big") for m in got.wait_for(3000)] == list(range(3000))


def test_a_driver_instance_is_not_reused_after_shutdown(managers) -> None:
    from sfm_driver_tcp import TcpDriver

    driver = TcpDriver()
    m = managers("server")
    handle = m.add_connector(driver, {"host": "127.0.0.1", "port": 0}, Mode.PASSIVE)
    m.start()
    m.wait_listening(handle, scaled(10))
    m.remove_connector(handle)
    handle = m.add_connector(driver, {"host": "127.0.0.1", "port": 0}, Mode.PASSIVE)
    with pytest.raises(CommError, match="use a new driver instance"):
        m.wait_listening(handle, scaled(5))


def test_a_first_frame_too_large_for_a_handshake_is_refused(managers, caplog) -> None:
    server = managers("server")
    url = listen(server)
    with RawPeer(url) as peer:
        peer.send(PREFIX.pack(2 << 20, 0, 4, 0, 0, 0, 1, 1))  # a "HELLO" of 2 MiB
        assert peer.is_closed_by_peer()
    assert "exceeds the maximum frame size of 1048576" in caplog.text


def test_a_slow_large_frame_is_not_taken_for_a_dead_peer(managers) -> None:
    # Every duration scaled alike: the gaps stay well inside the dead window, the whole well beyond it.
    server = managers("server", heartbeat_interval=scaled(0.2), heartbeat_check=scaled(0.05), dead_after=2)
    got = Collector()
    server.register_message_receiver(1, got)
    url = listen(server)
    with RawPeer(url) as peer:
        peer.handshake("trickle")
        payload = b"t" * (2 << 20)
        frame = PREFIX.pack(16 + len(payload), 0, 1, 0, 0, 1, 17, 2) + payload
        for i in range(0, len(frame), len(frame) // 12):  # 12 x 0.1 s in all, longer than 2 x 0.2 s
            peer.send(frame[i : i + len(frame) // 12])
            time.sleep(scaled(0.1))
        assert got.wait_for(1)[0][3] == payload


def _tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of one of our sockets (TCP_INFO's first byte: 1 established)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def test_stop_does_not_wait_for_a_hanging_connect(managers) -> None:
    import socket as _socket

    ls = _socket.socket()  # a listener whose accept queue is full: further SYNs are dropped
    ls.bind(("127.0.0.1", 0))
    ls.listen(0)
    fill = []
    try:
        for _ in range(4):
            s = _socket.socket()
            s.setblocking(False)
            s.connect_ex(ls.getsockname())
            fill.append(s)
        # With a backlog of 0, one established connection waiting in the queue fills it.
        wait_until(lambda: any(_tcp_state(s) == 1 for s in fill), what="the accept queue to fill")
        client = managers("site-1")
        # The connect timeout, far above the wait for stop() below, at any factor.
        url = f"tcp://127.0.0.1:{ls.getsockname()[1]}?connect_timeout={scaled(8)}"
        client.add_connector(url, {}, Mode.ACTIVE)
        client.start()
        ours = {s.fileno() for s in fill}

        def connect_hangs() -> bool:
            return any(
                c.raddr == ls.getsockname() and c.status == psutil.CONN_SYN_SENT and c.fd not in ours
                for c in psutil.Process().net_connections("tcp")
            )

        wait_until(connect_hangs, what="the client's connect to hang (SYN_SENT)")
        stopper = threading.Thread(target=client.stop)
        stopper.start()
        stopper.join(scaled(2.0))
        assert not stopper.is_alive(), "stop() waited for the hanging connect"
        assert not [t for t in threading.enumerate() if t.name.startswith("sfm-active")]
    finally:
        for s in fill:
            s.close()
        ls.close()
