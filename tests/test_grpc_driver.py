"""The gRPC driver over real gRPC on 127.0.0.1: sfm to sfm, bad peers, limits, batching, cleanup.

What every driver must do (handshake, data of every kind, large messages, clean stop) is
checked by the conformance suite in tests/test_conformance.py; this file tests what is
particular to gRPC.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from helpers import Collector, scaled, wait_ready, wait_until
from sfm_driver_grpc import GrpcDriver, wire
from sfm_driver_grpc.connection import BATCH_EXTENSION
from sfm_driver_grpc.driver import METHOD_PATH
from sfm_driver_grpc.proto import streamer_pb2

from sfm_core import CommError, ConnManager, Endpoint, EndpointState, Mode
from sfm_core.aio import acquire_loop, release_loop
from sfm_core.bench.fanin import in_child as fanin_in_child
from sfm_core.driver import ConnectorInfo, FrameReceiver
from sfm_core.frames import PREFIX, FrameType, decode_frame, encode_frame
from sfm_core.handshake import build_handshake

MIB = 1024 * 1024


class Pair:
    """A listening ConnManager "server" and a connecting "site-1", both READY."""

    def __init__(self, server_query: str = "", client_query: str = "", **server_kwargs) -> None:
        self.server = ConnManager(Endpoint("server", {"role": "srv"}), **server_kwargs)
        self.client = ConnManager(Endpoint("site-1", {"org": "a"}))
        self.server_rx = Collector()
        self.client_rx = Collector()
        self.server.register_message_receiver(1, self.server_rx)
        self.client.register_message_receiver(1, self.client_rx)
        h = self.server.add_connector(f"grpc://127.0.0.1:0{server_query}", {}, Mode.PASSIVE)
        self.server.start()
        self.url = self.server.wait_listening(h)
        self.client.add_connector(f"{self.url}{client_query}", {}, Mode.ACTIVE)
        self.client.start()
        self.to_server = wait_ready(self.client, "server")
        self.to_client = wait_ready(self.server, "site-1")

    def conns(self):
        return self.client.get_connections("server")[0].conn, self.server.get_connections("site-1")[0].conn

    def stop(self) -> None:
        self.client.stop()
        self.server.stop()


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.stop()


class RawGrpcPeer:
    """A bare grpc.aio stream to a listener, speaking SFM through the sans-I/O codec."""

    def __init__(self, url: str) -> None:
        self.lt = acquire_loop()
        self.target = url.split("://", 1)[1]

        async def open_():
            channel = grpc.aio.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)])
            return channel, channel.stream_stream(METHOD_PATH)()

        self.channel, self.call = self.lt.run(open_(), 10)

    def send_raw(self, message: bytes) -> None:
        self.lt.run(self.call.write(message), 10)

    def send_data(self, data: bytes) -> None:
        self.send_raw(streamer_pb2.Frame(seq=1, data=data).SerializeToString())

    def send_frame(self, ftype: int, payload: bytes | None = None, app_id: int = 0, headers=None) -> None:
        self.send_data(b"".join(encode_frame(ftype, app_id, 1, headers, payload, sequence=1)))

    def hello(self, name: str) -> None:
        self.send_frame(FrameType.HELLO, build_handshake(name, {}))

    def read(self, timeout: float = 5.0):
        async def read_():
            try:
                return await self.call.read()
            except grpc.aio.AioRpcError:  # the server ended the stream with an error status
                return grpc.aio.EOF

        msg = self.lt.run(read_(), timeout)
        if msg is grpc.aio.EOF:
            return None
        return streamer_pb2.Frame.FromString(msg).data

    def status(self, timeout: float = 5.0) -> tuple[grpc.StatusCode, str]:
        async def st():
            return await self.call.code(), await self.call.details()

        return self.lt.run(st(), timeout)

    def close(self) -> None:
        async def close_():
            self.call.cancel()
            await self.channel.close()

        try:
            self.lt.run(close_(), 10)
        finally:
            # grpc.aio keeps its poller thread while any of its objects lives.
            self.call = self.channel = None
            release_loop()


@pytest.fixture
def raw_peers():
    peers: list[RawGrpcPeer] = []

    def make(url: str) -> RawGrpcPeer:
        p = RawGrpcPeer(url)
        peers.append(p)
        return p

    yield make
    for p in peers:
        p.close()


# -- the Frame codec --------------------------------------------------------------------------


@pytest.mark.parametrize("seq", [0, 1, 127, 128, 300, 2**31 - 1, -1, -(2**31)])
@pytest.mark.parametrize("size", [0, 1, 16, 127, 128, 70000])
def test_wire_codec_matches_generated_protobuf(seq, size):
    data = os.urandom(size)
    ours = wire.encode(seq, [data[: size // 2], memoryview(data)[size // 2 :]])
    reference = streamer_pb2.Frame(seq=seq, data=data).SerializeToString()
    assert ours == reference
    got_seq, got_data = wire.decode(reference)
    assert (got_seq, bytes(got_data)) == (seq, data)


def test_wire_decode_skips_unknown_fields_and_names_bad_input():
    msg = b"\x1d\x01\x02\x03\x04" + streamer_pb2.Frame(seq=5, data=b"abc").SerializeToString() + b"\x20\x07"
    assert wire.decode(msg)[0] == 5 and bytes(wire.decode(msg)[1]) == b"abc"
    with pytest.raises(CommError, match="says 100 bytes but only 3 follow"):
        wire.decode(b"\x12\x64abc")
    with pytest.raises(CommError, match="cut inside a varint"):
        wire.decode(b"\x08\xff")
    with pytest.raises(CommError, match="unsupported wire type"):
        wire.decode(b"\x0b")


# -- sfm to sfm -------------------------------------------------------------------------------


def test_order_kept_and_batching_agreed_between_sfm_peers(pair):
    client_conn, server_conn = pair.conns()
    assert client_conn.extensions == server_conn.extensions == frozenset({BATCH_EXTENSION})
    n = 5000
    for i in range(n):
        pair.client.send_message(pair.to_server, 1, {"i": i}, b"x" * 100)
    got = pair.server_rx.wait_for(n, timeout=30)
    assert [m[2]["i"] for m in got] == list(range(n))
    # Several frames travelled in one gRPC message at least once.
    assert server_conn.stats["frames_in"] > server_conn.stats["messages_in"]
    assert client_conn.stats["frames_out"] == server_conn.stats["frames_in"]


def test_batching_not_used_when_the_peer_does_not_offer_it():
    p = Pair(client_query="?batch=0")
    try:
        client_conn, server_conn = p.conns()
        assert client_conn.extensions == server_conn.extensions == frozenset()
        for i in range(3000):
            p.server.send_message(p.to_client, 1, {"i": i}, b"y" * 100)
        got = p.client_rx.wait_for(3000, timeout=30)
        assert [m[2]["i"] for m in got] == list(range(3000))
        assert server_conn.stats["frames_out"] == server_conn.stats["messages_out"]
        assert client_conn.stats["frames_in"] == client_conn.stats["messages_in"]
    finally:
        p.stop()


def test_batching_not_used_toward_a_peer_without_sfm_ext(raw_peers):
    server = ConnManager(Endpoint("server"))
    h = server.add_connector("grpc://127.0.0.1:0", {}, Mode.PASSIVE)
    server.start()
    try:
        peer = raw_peers(server.wait_listening(h))
        peer.hello("plain")
        ready = decode_frame(peer.read())
        assert ready.type == FrameType.READY
        import msgpack

        assert "sfm_ext" not in msgpack.unpackb(ready.payload)  # READY offers a plain peer nothing
        ep = wait_ready(server, "plain")
        for i in range(2000):
            server.send_message(ep, 1, {"i": i}, b"z" * 100)
        for i in range(2000):
            frame = decode_frame(peer.read())  # raises unless Frame.data is exactly one frame
            assert frame.headers == {"i": i}
    finally:
        server.stop()


def test_a_burst_right_after_ready_arrives_on_the_first_connection():
    # The server batches READY with the DATA behind it: the client must accept that batch
    # although its core has not yet processed READY (it offered batching itself).
    server = ConnManager(Endpoint("server"))
    client = ConnManager(Endpoint("site-1"), reconnect_min=0.05)
    got = Collector()
    client.register_message_receiver(1, got)

    class Burst:
        def state_change(self, endpoint) -> None:
            if endpoint.state == EndpointState.READY:
                for i in range(300):
                    server.send_message(endpoint, 1, None, b"%d" % i)

    server.add_endpoint_monitor(Burst())
    h = server.add_connector("grpc://127.0.0.1:0", {}, Mode.PASSIVE)
    server.start()
    try:
        client.add_connector(server.wait_listening(h), {}, Mode.ACTIVE)
        client.start()
        msgs = got.wait_for(300)
        assert [m[3] for m in msgs] == [b"%d" % i for i in range(300)]
        assert client.connectors[next(iter(client.connectors))].total_conns == 1  # nothing dropped
    finally:
        client.stop()
        server.stop()


def test_batches_fit_a_peer_with_a_smaller_max_frame_size():
    p = Pair(max_frame_size=65536)  # the server's frames are small; the client's batches are not
    try:
        for _ in range(3000):
            p.client.send_message(p.to_server, 1, None, b"k" * 1024)
        assert len(p.server_rx.wait_for(3000)) == 3000
        assert p.conns()[0].stats["frames_out"] > p.conns()[0].stats["messages_out"]  # batched
    finally:
        p.stop()


# -- bad input --------------------------------------------------------------------------------


@pytest.fixture
def listener():
    server = ConnManager(Endpoint("server"), max_frame_size=65536)
    h = server.add_connector("grpc://127.0.0.1:0", {}, Mode.PASSIVE)
    server.start()
    url = server.wait_listening(h)
    yield server, url
    server.stop()


def _bad_input_closes_only_that_stream(listener, raw_peers, caplog, send, expected: str) -> None:
    server, url = listener
    good = raw_peers(url)
    good.hello("good")
    assert decode_frame(good.read()).type == FrameType.READY
    bad = raw_peers(url)
    with caplog.at_level(logging.WARNING, logger="sfm_driver_grpc"):
        send(bad)
        assert bad.read() is None  # the server ended this stream
        code, details = bad.status()
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), (code, details)
    assert expected in details or expected in caplog.text
    # The other stream is still served.
    good.send_frame(FrameType.PING, b"\xc0")
    assert decode_frame(good.read()).type == FrameType.PONG
    assert server.find_endpoint("good").state == EndpointState.READY


def test_garbage_stream_closes_only_that_stream(listener, raw_peers, caplog):
    _bad_input_closes_only_that_stream(
        listener, raw_peers, caplog, lambda p: p.send_raw(b"\xffgarbage not a Frame"), "unsupported wire type"
    )


def test_garbage_frame_data_closes_only_that_stream(listener, raw_peers, caplog):
    _bad_input_closes_only_that_stream(
        listener, raw_peers, caplog, lambda p: p.send_data(b"short"), "shorter than the 16-byte SFM prefix"
    )


def test_frame_whose_length_field_lies(listener, raw_peers, caplog):
    def send(p):
        data = bytearray(b"".join(encode_frame(FrameType.HELLO, 0, 1, None, build_handshake("liar", {}))))
        PREFIX.pack_into(data, 0, len(data) + 10, 0, FrameType.HELLO, 0, 0, 0, 1, 1)
        p.send_data(bytes(data))

    _bad_input_closes_only_that_stream(listener, raw_peers, caplog, send, "frame length field says")


def test_frame_length_over_the_maximum(listener, raw_peers, caplog):
    def send(p):
        data = bytearray(32)
        PREFIX.pack_into(data, 0, 100_000, 0, FrameType.DATA, 0, 0, 1, 1, 1)
        p.send_data(bytes(data))

    _bad_input_closes_only_that_stream(listener, raw_peers, caplog, send, "exceeds the maximum frame size")


def test_oversized_message_is_refused(listener, raw_peers, caplog):
    def send(p):
        p.send_frame(FrameType.DATA, b"o" * 300_000, app_id=1)  # over the 256 KiB batch limit too

    _bad_input_closes_only_that_stream(listener, raw_peers, caplog, send, "larger than max")


def test_batch_from_a_peer_that_did_not_agree_is_refused(listener, raw_peers, caplog):
    def send(p):
        p.send_data(b"".join(encode_frame(FrameType.HELLO, 0, 1, None, build_handshake("b1", {}))) * 2)

    server, url = listener
    plain = raw_peers(url)
    plain.hello("no-ext")  # no sfm_ext: batching is not agreed with this peer
    assert decode_frame(plain.read()).type == FrameType.READY
    wait_until(lambda: server.get_connections("no-ext"), what="no-ext connection")
    conn = server.get_connections("no-ext")[0].conn
    wait_until(lambda: conn._ext_known, what="extensions set")
    with caplog.at_level(logging.WARNING, logger="sfm_driver_grpc"):
        plain.send_frame(FrameType.PING, b"\xc0")
        plain.read()
        send(plain)
        assert plain.read() is None
    assert "frame length field says" in caplog.text


_DYING_CLIENT = """
import asyncio, sys, grpc
from sfm_core.frames import FrameType, encode_frame
from sfm_core.handshake import build_handshake
from sfm_driver_grpc import wire
async def main():
    ch = grpc.aio.insecure_channel(sys.argv[1], options=[("grpc.max_send_message_length", 2**31 - 1)])
    call = ch.stream_stream("/streamer.Streamer/Stream")()
    await call.write(wire.encode(1, encode_frame(FrameType.HELLO, 0, 1, None, build_handshake("dying", {}))))
    await call.read()
    print("ready", flush=True)
    big = encode_frame(FrameType.DATA, 1, 17, None, bytes(256 * 1024 * 1024))
    while True:
        await call.write(wire.encode(2, big))
asyncio.run(main())
"""


def test_peer_gone_mid_stream(listener, raw_peers):
    server, url = listener
    good = raw_peers(url)
    good.hello("good")
    assert decode_frame(good.read()).type == FrameType.READY
    server.connectors  # noqa: B018
    proc = subprocess.Popen(
        [sys.executable, "-c", _DYING_CLIENT, url.split("://")[1]], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        ep = wait_ready(server, "dying")
        time.sleep(0.3)  # it is in the middle of a 256 MiB message now
        proc.send_signal(signal.SIGKILL)
        wait_until(lambda: ep.state == EndpointState.DISCONNECTED, 10, "dying DISCONNECTED")
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    good.send_frame(FrameType.PING, b"\xc0")
    assert decode_frame(good.read()).type == FrameType.PONG


def test_listener_gone_closes_the_client_and_send_raises(pair):
    client_conn, _ = pair.conns()
    pair.server.stop()
    wait_until(lambda: pair.to_server.state == EndpointState.DISCONNECTED, 10, "server DISCONNECTED")
    with pytest.raises(CommError):
        pair.client.send_message(pair.to_server, 1, None, b"late")
    with pytest.raises(CommError) as e:
        client_conn.send_frame([b"x" * 16])
    assert e.value.code == CommError.CLOSED


def test_send_after_close_raises(pair):
    client_conn, _ = pair.conns()
    client_conn.close()
    with pytest.raises(CommError) as e:
        client_conn.send_frame(encode_frame(FrameType.DATA, 1, 17, None, b"x"))
    assert e.value.code == CommError.CLOSED
    client_conn.close()  # idempotent


@pytest.mark.allow_leaks
def test_cannot_bind_a_port_in_use(pair):
    # grpc core keeps two epoll and two eventfd descriptors (no thread) for the rest of the
    # process after a failed bind, even after gc; checked by hand below instead of no_leaks.
    threads = set(threading.enumerate())
    fds = set(os.listdir("/proc/self/fd"))
    port = int(pair.url.rsplit(":", 1)[1])
    other = ConnManager(Endpoint("other"))
    h = other.add_connector(f"grpc://127.0.0.1:{port}", {}, Mode.PASSIVE)
    other.start()
    try:
        with pytest.raises(CommError, match="cannot listen"):
            other.wait_listening(h, 10)
    finally:
        other.stop()
    assert set(threading.enumerate()) <= threads
    left = []
    for fd in set(os.listdir("/proc/self/fd")) - fds:
        try:
            left.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    assert all(t in ("anon_inode:[eventpoll]", "anon_inode:[eventfd]") for t in left), left


def test_connect_refused_raises_commerror():
    driver = GrpcDriver()
    with pytest.raises(CommError, match="cannot connect"):
        params = {"host": "127.0.0.1", "port": 1, "connect_timeout": "0.5"}
        driver.connect(ConnectorInfo("CH1", driver, params, Mode.ACTIVE))
    driver.shutdown()


def test_shutdown_ends_a_pending_connect_and_leaks_nothing():
    # A peer whose kernel accepts the TCP connection but that never speaks HTTP/2: the
    # channel stays CONNECTING, as with a hung server. shutdown() must end the connect soon,
    # with a clear error, and close the channel it was opening (the leak check sees it).
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    driver = GrpcDriver()
    params = {"host": "127.0.0.1", "port": silent.getsockname()[1], "connect_timeout": "30"}
    errors: list[CommError] = []

    def connect() -> None:
        try:
            driver.connect(ConnectorInfo("CH1", driver, params, Mode.ACTIVE))
        except CommError as e:
            errors.append(e)

    t = threading.Thread(target=connect)
    t.start()
    try:
        time.sleep(0.3)  # the connect is under way
        t0 = time.monotonic()
        driver.shutdown()
        t.join(10)
        assert not t.is_alive() and time.monotonic() - t0 < 2.0
        assert errors and "the driver is shut down" in errors[0].message, errors
    finally:
        driver.shutdown()
        t.join(10)
        silent.close()


# -- backpressure and scale -------------------------------------------------------------------


def test_backpressure_reaches_the_sender():
    p = Pair(client_query="?send_timeout=1&send_queue_bytes=1048576", queue_bytes=2 * MIB, queue_frames=64)
    try:
        p.server_rx.gate = threading.Event()  # the receiver stops taking messages
        chunk = b"b" * (256 * 1024)
        sent = 0
        t0 = time.monotonic()
        with pytest.raises(CommError) as e:
            while time.monotonic() - t0 < 20:
                p.client.send_message(p.to_server, 1, {"i": sent}, chunk)
                sent += 1
        assert e.value.code == CommError.TIMEOUT
        # Bounded by the receiver's lane, gRPC's flow-control windows and the send queue.
        assert sent * len(chunk) < 96 * MIB, sent
        p.server_rx.gate.set()
        got = p.server_rx.wait_for(sent, timeout=30)
        assert [m[2]["i"] for m in got] == list(range(sent))
        p.client.send_message(p.to_server, 1, {"i": sent}, chunk)  # flowing again
        p.server_rx.wait_for(sent + 1)
    finally:
        if p.server_rx.gate is not None:
            p.server_rx.gate.set()
        p.stop()


def test_a_send_from_the_loop_thread_over_a_full_queue_raises_instead_of_deadlocking():
    # A receiver running on the event loop (or a driver callback) that sends: it cannot wait
    # for the queue to drain, since the loop thread is the one that drains it.
    p = Pair(client_query="?send_queue_bytes=65536")
    lt = acquire_loop()
    try:
        sfm_conn = p.client.get_connections("server")[0]
        chunk = b"c" * 40_000

        async def two_sends() -> CommError | None:
            sfm_conn.send_data(1, 1, None, chunk)
            try:
                sfm_conn.send_data(1, 2, None, chunk)
            except CommError as e:
                return e
            return None

        err = lt.run(two_sends(), 10)
        assert err is not None and err.code == CommError.TIMEOUT, err
        assert "event loop thread" in err.message
        # Only that send failed: the connection goes on.
        p.client.send_message(p.to_server, 1, None, b"after")
        assert [bytes(m[3]) for m in p.server_rx.wait_for(2)] == [chunk, b"after"]
    finally:
        p.stop()
        release_loop()


def test_no_cap_at_100_streams(listener):
    _server, url = listener
    result = fanin_in_child("grpc")(url, 160, 30.0)  # 160 light sfm clients, each its own stream
    assert result["ready"] == 160, result


# -- urgent control frames, drain, frames dropped unsent --------------------------------------

URGENT = b"".join(encode_frame(FrameType.PING, 0, 999, None, b"\xc0"))  # stream 999: ours, not the core's
DATA_SIZE = 100_000


class CountingReceiver(FrameReceiver):
    """Counts ``bytes_sent`` calls and hands everything else on to the core's receiver."""

    def __init__(self, inner: FrameReceiver) -> None:
        self.inner = inner
        self.sent = 0

    def process_frame(self, frame) -> None:
        self.inner.process_frame(frame)

    def process_frames(self, frames) -> None:
        self.inner.process_frames(frames)

    def bytes_received(self) -> None:
        self.inner.bytes_received()

    def bytes_sent(self) -> None:
        self.sent += 1


class StalledPair(Pair):
    """A Pair whose server takes nothing (its receiver waits on ``gate``, so its lane fills and it
    stops reading), with a thread sending 100 kB DATA frames (header ``i``) on the client's
    connection, straight to the driver, until told to stop."""

    def __init__(self) -> None:
        super().__init__(client_query="?send_queue_bytes=1048576&send_timeout=30", queue_bytes=2 * MIB, queue_frames=64)
        self.gate = self.server_rx.gate = threading.Event()
        self.conn, self.server_conn = self.conns()
        self.rx = CountingReceiver(self.conn.frame_receiver)
        self.conn.register_frame_receiver(self.rx)
        # The frames as the server's driver hands them to its core, in order.
        self.received: list = []
        deliver = self.server_conn.process_frames

        def record(frames) -> None:
            for f in frames:
                frame = decode_frame(f)
                if frame.type == FrameType.PING and frame.stream_id == 999:
                    self.received.append("urgent")
                elif frame.type == FrameType.DATA and frame.headers and "i" in frame.headers:
                    self.received.append(frame.headers["i"])
            deliver(frames)

        self.server_conn.process_frames = record
        self.sent: list[int] = []
        self.errors: list[BaseException] = []
        self.sending = False
        self.stop_sending = threading.Event()
        self.sender = threading.Thread(target=self._send, name="test-sender")
        self.sender.start()

    def _send(self) -> None:
        i = 0
        try:
            while not self.stop_sending.is_set():
                frame = list(encode_frame(FrameType.DATA, 1, 17, {"i": i}, bytes(DATA_SIZE)))
                self.sending = True
                self.conn.send_frame(frame)
                self.sending = False
                self.sent.append(i)
                i += 1
        except CommError as e:
            self.errors.append(e)

    def _blocked(self) -> bool:
        conn = self.conn
        return bool(self.sending and conn._queued_bytes + DATA_SIZE > conn._send_queue_bytes and conn._queue)

    def wait_blocked(self) -> int:
        """Wait until the sender waits for room in a full send queue and the writer is stuck too
        (the server stopped reading and gRPC's flow-control windows are full: no message has
        gone out for a while); the frames queued then."""
        seen: list = [None, 0.0]

        def stuck() -> bool:
            if self.errors:
                return True
            if not (self._blocked() and self.server_conn._paused):
                seen[0] = None
                return False
            out, now = self.conn.stats["messages_out"], time.monotonic()
            if out != seen[0]:
                seen[:] = [out, now]
                return False
            return now - seen[1] >= scaled(0.2)

        wait_until(stuck, 30, "sender blocked on a full send queue, writer stuck on flow control")
        assert not self.errors, self.errors
        return len(self.conn._queue)

    def queued_indexes(self) -> list[int]:
        with self.conn._lock:
            return [decode_frame(wire.decode(msg)[1]).headers["i"] for msg, _ in self.conn._queue]

    def resume(self) -> None:
        """Stop sending, let the server take everything, wait for all of it."""
        self.stop_sending.set()
        self.gate.set()
        self.sender.join(scaled(20))
        assert not self.sender.is_alive()
        self.server_rx.wait_for(len(self.sent), timeout=30)

    def stop(self) -> None:
        self.stop_sending.set()
        self.gate.set()
        self.sender.join(scaled(20))
        super().stop()


@pytest.fixture
def stalled():
    p = StalledPair()
    yield p
    p.stop()


def test_urgent_frame_goes_before_queued_data_while_a_sender_is_blocked(stalled):
    stalled.wait_blocked()
    taken: list = []
    urgent = threading.Thread(target=lambda: taken.append(stalled.conn.send_urgent(URGENT)))
    urgent.start()
    urgent.join(scaled(5))
    assert taken == [True], "send_urgent blocked or refused while a sender waits for room"
    still_queued = stalled.queued_indexes()
    assert still_queued, "nothing queued behind the urgent frame: the test did not fill the queue"
    stalled.resume()
    assert not stalled.errors, stalled.errors
    wait_until(lambda: "urgent" in stalled.received, what="urgent frame at the server")
    order = stalled.received
    assert [x for x in order if x != "urgent"] == list(range(len(stalled.sent)))
    assert order.index("urgent") < order.index(still_queued[0]), (order.index("urgent"), still_queued[0])
    # Writes completed while the sender waited: the core hears the peer is alive.
    assert stalled.rx.sent > 0


def test_drain_waits_until_everything_is_written(stalled):
    queued = stalled.wait_blocked()
    # The server reads nothing: a short drain gives up with frames still unsent.
    assert stalled.conn.drain(scaled(0.2)) >= queued > 0
    lt = acquire_loop()
    try:

        async def drain_on_loop() -> int:
            return stalled.conn.drain(60.0)  # the loop is the writer: it cannot wait there

        assert lt.run(drain_on_loop(), scaled(5)) >= queued
    finally:
        release_loop()
    stalled.stop_sending.set()
    stalled.gate.set()
    assert stalled.conn.drain(scaled(10)) == 0
    stalled.resume()
    assert stalled.conn.drain(0) == 0


def test_frames_dropped_unsent_on_close_are_logged(stalled, caplog):
    queued = stalled.wait_blocked()
    with caplog.at_level(logging.WARNING, logger="sfm_driver_grpc"):
        stalled.conn.close()
        stalled.sender.join(scaled(10))
        assert stalled.errors and stalled.errors[0].code == CommError.CLOSED
        wait_until(lambda: "dropped unsent" in caplog.text, what="warning about dropped frames")
    [record] = [r for r in caplog.records if "dropped unsent" in r.getMessage()]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert stalled.conn.name in message and f"with {queued} frame(s)" in message, message
    assert stalled.conn.drain(0) >= queued  # what was lost is what drain reports from then on
