"""Small frames queued behind a write in flight go out together (sfm_core/sfm_connection.py's
writer role over the TCP driver's ``send_frames``); a lone message is written by its own
thread before ``send_message`` returns; order, exactly-once and the buffer-reuse rule hold."""

from __future__ import annotations

import threading

import pytest
from helpers import Collector, RawPeer, scaled, unread_bytes, wait_ready, wait_until

from sfm_core import ConnManager, Endpoint, MessageReceiver, Mode
from sfm_core.frames import FrameType


@pytest.fixture
def managers():
    made: list[ConnManager] = []

    def make(name: str, **kwargs) -> ConnManager:
        m = ConnManager(Endpoint(name), **kwargs)
        made.append(m)
        return m

    yield make
    for m in made:
        m.stop()


def listen(manager: ConnManager) -> str:
    handle = manager.add_connector("tcp://127.0.0.1:0", {}, Mode.PASSIVE)
    manager.start()
    return manager.wait_listening(handle, scaled(5))


def pair(managers):
    server = managers("server")
    got = Collector()
    server.register_message_receiver(1, got)
    url = listen(server)
    client = managers("site-1")
    client.add_connector(url, {}, Mode.ACTIVE)
    client.start()
    return server, client, wait_ready(client, "server"), got


def counting_batches(sfm_conn) -> list:
    """Record the frame count of every send_frames call the core makes on ``sfm_conn``."""
    counts: list = []
    real = sfm_conn._send_frames

    def spy(bufs, count):
        counts.append(count)
        real(bufs, count)

    sfm_conn._send_frames = spy
    return counts


def test_four_senders_each_in_order_exactly_once(managers) -> None:
    _server, client, to_server, got = pair(managers)
    threads, per = 4, 2000

    def run(t: int) -> None:
        for i in range(per):
            client.send_message(to_server, 1, {"t": t, "i": i}, b"p" * 100)

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(scaled(60))
    msgs = got.wait_for(threads * per, timeout=scaled(60))
    assert len(msgs) == threads * per
    for t in range(threads):
        assert [m[2]["i"] for m in msgs if m[2]["t"] == t] == list(range(per))  # in order, once each
    [conn] = client.get_connections("server")
    assert not conn._writing and not conn._pending


def blocked_writer(managers):
    """A server whose connection to a raw peer that stopped reading has a writer blocked in
    the middle of a 64 MiB frame; returns (server, endpoint, peer, writer thread)."""
    server = managers("server")
    url = listen(server)
    peer = RawPeer(url)
    peer.handshake("sink")
    sink = wait_ready(server, "sink")
    big = b"B" * (64 << 20)
    writer = threading.Thread(target=server.send_message, args=(sink, 1, {"n": "big"}, big))
    writer.start()
    wait_until(lambda: unread_bytes(peer.sock) > 0, what="the big frame to start")
    [conn] = server.get_connections("sink")
    wait_until(lambda: conn._writing, what="the writer role")
    return server, sink, peer, writer, conn


def read_data_frames(peer: RawPeer, n: int) -> list:
    frames = []
    while len(frames) < n:
        frame = peer.read_frame(timeout=30)
        if frame.type == FrameType.DATA:
            frames.append(frame)
    return frames


def test_frames_queue_behind_a_write_in_flight_and_go_out_together_in_order(managers) -> None:
    server, sink, peer, writer, conn = blocked_writer(managers)
    try:
        counts = counting_batches(conn)
        kept = bytearray(b"k" * 100)

        def senders() -> None:
            for i in range(50):
                server.send_message(sink, 1, {"n": i}, kept if i == 7 else b"s%d" % i)
            kept[:] = b"X" * 100  # the sender may reuse its buffer once send_message returned

        t = threading.Thread(target=senders)
        t.start()
        t.join(scaled(10))
        assert not t.is_alive(), "queued sends must return while the writer is blocked"
        assert writer.is_alive()
        assert conn._pending_frames == 50
        frames = read_data_frames(peer, 51)  # the peer reads again: the writer finishes
        writer.join(scaled(30))
        assert [f.headers["n"] for f in frames] == ["big", *range(50)]
        assert bytes(frames[8].payload) == b"k" * 100  # the copy taken before the reuse
        assert counts == [50]  # the 50 queued frames went out in one send_frames
    finally:
        peer.close()


def test_a_large_writable_buffer_waits_for_the_writer_and_is_not_copied(managers) -> None:
    server, sink, peer, writer, conn = blocked_writer(managers)
    try:
        big = bytearray(b"w" * 8192)
        done = threading.Event()

        def send() -> None:
            server.send_message(sink, 1, {"n": "w"}, big)
            big[:] = b"Z" * 8192
            done.set()

        t = threading.Thread(target=send)
        t.start()
        assert not done.wait(0.2) and conn._pending_frames == 0  # waits: it is not queued (copied)
        frames = read_data_frames(peer, 2)
        t.join(scaled(30))
        assert done.is_set()
        assert [f.headers["n"] for f in frames] == ["big", "w"]
        assert bytes(frames[1].payload) == b"w" * 8192
    finally:
        peer.close()


def test_a_lone_message_is_written_before_send_message_returns(managers) -> None:
    server = managers("server")
    url = listen(server)
    with RawPeer(url) as peer:
        peer.handshake("sink")
        sink = wait_ready(server, "sink")
        [conn] = server.get_connections("sink")
        buf = bytearray(b"a" * 100)
        server.send_message(sink, 1, None, buf)
        # Written by this thread: nothing left queued, no writer, the bytes in the peer's socket.
        assert not conn._writing and not conn._pending
        assert unread_bytes(peer.sock) > 0
        buf[:] = b"b" * 100
        assert bytes(read_data_frames(peer, 1)[0].payload) == b"a" * 100


def test_request_reply_goes_on_without_waiting_for_company(managers) -> None:
    server = managers("server")
    client = managers("site-1")

    class Echo(MessageReceiver):
        def process_message(self, endpoint, connection, app_id, message) -> None:
            server.send_message(endpoint, 1, message.headers, message.payload)

    replies: list = []
    arrived = threading.Event()

    class Back(MessageReceiver):
        def process_message(self, endpoint, connection, app_id, message) -> None:
            replies.append(message.headers["i"])
            arrived.set()

    server.register_message_receiver(1, Echo())
    client.register_message_receiver(1, Back())
    url = listen(server)
    client.add_connector(url, {}, Mode.ACTIVE)
    client.start()
    to_server = wait_ready(client, "server")
    for i in range(200):
        arrived.clear()
        client.send_message(to_server, 1, {"i": i}, b"ping")
        assert arrived.wait(scaled(5)), f"reply {i} did not arrive"  # no message waits for a next one
    assert replies == list(range(200))
