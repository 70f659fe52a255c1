"""The WebSocket driver (ws://, http://) over real sockets on 127.0.0.1.

What every driver must do (handshake, data of every kind, order, reconnect, fan-in, clean
stop, the buffer-reuse rule) is checked by the conformance suite, which runs on this driver
in tests/test_conformance.py; this file tests what is particular to WebSocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
import time

import psutil
import pytest
from helpers import Collector, closed_by_peer, scaled, wait_ready, wait_until
from websockets.frames import apply_mask

from sfm_core import CommError, ConnectorInfo, ConnManager, Endpoint, EndpointState, Mode
from sfm_core.driver import FrameReceiver
from sfm_core.frames import FrameType, decode_frame, encode_frame
from sfm_core.handshake import build_handshake
from sfm_core.url import parse_url

pytest.importorskip("sfm_driver_websocket")
from sfm_driver_websocket import WebSocketDriver

MIB = 1024 * 1024
LOGGER = "sfm_driver_websocket"


# -- a raw WebSocket client over a plain socket (for the bad-input cases) ------------------------


class RawWs:
    """A hand-made RFC 6455 client: upgrade, then frames built byte by byte (mask key 0)."""

    def __init__(self, url: str, path: str = "/f3", upgrade: bool = True, timeout: float = 5.0) -> None:
        p = parse_url(url)
        self.sock = socket.create_connection((p["host"], p["port"]), timeout=timeout)
        self.buf = b""
        if upgrade:
            self.status = self.request(path)

    def request(self, path: str, upgrade: bool = True) -> int:
        lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1"]
        if upgrade:
            lines += [
                "Upgrade: websocket",
                "Connection: Upgrade",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version: 13",
            ]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return self.read_status()

    def read_status(self) -> int:
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before an HTTP response: {self.buf!r}")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        self.response = head.decode()
        return int(head.split()[1])

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True, declared: int | None = None) -> None:
        n = len(payload) if declared is None else declared
        b0 = (0x80 if fin else 0) | opcode
        if n < 126:
            head = struct.pack("!BB", b0, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", b0, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", b0, 0x80 | 127, n)
        self.sock.sendall(head + b"\x00\x00\x00\x00" + payload)

    def recv_frame(self) -> tuple[int, bytes]:
        def need(k: int) -> bytes:
            while len(self.buf) < k:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("closed")
                self.buf += chunk
            out, self.buf = self.buf[:k], self.buf[k:]
            return out

        b0, b1 = need(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", need(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", need(8))
        return b0 & 0x0F, need(n)

    def wait_close_code(self) -> int:
        """Read frames until the server's close frame; return its code."""
        while True:
            opcode, data = self.recv_frame()
            if opcode == 0x8:
                return struct.unpack("!H", data[:2])[0]

    def hello(self, name: str) -> None:
        frame = b"".join(encode_frame(FrameType.HELLO, 0, 1, None, build_handshake(name, {})))
        self.send_frame(0x2, frame)

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        return closed_by_peer(self.sock, timeout)

    def close(self) -> None:
        self.sock.close()


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def managers():
    made: list[ConnManager] = []

    def make(name: str, **kwargs) -> ConnManager:
        cm = ConnManager(Endpoint(name, {"role": name}), **kwargs)
        made.append(cm)
        return cm

    yield make
    for cm in reversed(made):
        cm.stop()


def serve(make, scheme: str = "ws", params: dict | None = None, **kwargs) -> tuple[ConnManager, str, Collector]:
    server = make("server", **kwargs)
    col = Collector()
    server.register_message_receiver(1, col)
    h = server.add_connector(f"{scheme}://127.0.0.1:0", params or {}, Mode.PASSIVE)
    server.start()
    return server, server.wait_listening(h), col


def pair(make, scheme: str = "ws", server_params: dict | None = None, client_params: dict | None = None, **kwargs):
    server, url, scol = serve(make, scheme, server_params, **kwargs)
    client = make("site-1", **kwargs)
    ccol = Collector()
    client.register_message_receiver(1, ccol)
    client.add_connector(url, client_params or {}, Mode.ACTIVE)
    client.start()
    wait_ready(client, "server")
    wait_ready(server, "site-1")
    return server, client, scol, ccol, url


# -- the happy paths ----------------------------------------------------------------------


def test_fragmented_message_from_peer_is_one_frame(managers):
    server, url, col = serve(managers)
    ws = RawWs(url)
    try:
        assert ws.status == 101
        ws.hello("raw-1")
        assert ws.recv_frame()[0] == 0x2  # READY
        wait_ready(server, "raw-1")
        frame = b"".join(encode_frame(FrameType.DATA, 1, 17, {"h": 1}, b"abcdef" * 1000))
        ws.send_frame(0x2, frame[:10], fin=False)
        ws.send_frame(0x0, frame[10:5000], fin=False)
        ws.send_frame(0x0, frame[5000:], fin=True)
        [(_, _, headers, payload, _)] = col.wait_for(1)
        assert headers == {"h": 1} and payload == b"abcdef" * 1000
    finally:
        ws.close()


# -- bad input: each closes that connection only, with a logged reason -------------------------


def test_wrong_path_gets_404_and_live_connections_go_on(managers):
    _server, client, scol, _, url = pair(managers)
    ws = RawWs(url, path="/nope")
    try:
        assert ws.status == 404
        assert "/f3" in ws.buf.decode(errors="replace") or ws.closed_by_peer()
    finally:
        ws.close()
    client.send_message(client.find_endpoint("server"), 1, None, b"still here")
    assert scol.wait_for(1)[0][3] == b"still here"


def test_active_side_wrong_path_raises_commerror(managers):
    _, url, _ = serve(managers)
    p = parse_url(url)
    connector = ConnectorInfo("CH-test", WebSocketDriver(), {**p, "path": "/other"}, Mode.ACTIVE)
    with pytest.raises(CommError) as e:
        connector.driver.connect(connector)
    assert "404" in str(e.value)


def test_plain_http_request_gets_4xx(managers):
    _server, client, scol, _, url = pair(managers)
    raw = RawWs(url, upgrade=False)
    try:
        status = raw.request("/f3", upgrade=False)
        assert 400 <= status < 500
        assert raw.closed_by_peer()
    finally:
        raw.close()
    client.send_message(client.find_endpoint("server"), 1, None, b"ok")
    assert scol.wait_for(1)[0][3] == b"ok"


def test_not_http_at_all_gets_400(managers, caplog):
    _, url, _ = serve(managers)
    raw = RawWs(url, upgrade=False)
    try:
        with caplog.at_level(logging.INFO, logger=LOGGER):
            raw.sock.sendall(b"\x16\x03\x01\x00\xa5garbage that is not HTTP\r\n\r\n")
            assert raw.read_status() == 400
            assert raw.closed_by_peer()
        wait_until(lambda: "not a WebSocket client" in caplog.text, what="logged reason")
    finally:
        raw.close()


@pytest.mark.parametrize(
    ("case", "code", "reason"),
    [
        ("text", 1003, "text message"),
        ("short", 1007, "shorter than the 16-byte SFM prefix"),
        ("length", 1007, "length field says"),
        ("header_len", 1007, "header_len"),
        ("oversized", 1009, "too big"),
    ],
)
def test_bad_messages_close_that_connection_only(managers, caplog, case, code, reason):
    server, client, scol, _, url = pair(managers, server_params={"max_frame_size": str(MIB)})
    ws = RawWs(url)
    try:
        assert ws.status == 101
        ws.hello("raw-1")
        assert ws.recv_frame()[0] == 0x2
        wait_ready(server, "raw-1")
        with caplog.at_level(logging.INFO, logger=LOGGER):
            if case == "text":
                ws.send_frame(0x1, b"hello")
            elif case == "short":
                ws.send_frame(0x2, b"\x00\x00\x00\x05abc")
            elif case == "length":
                frame = bytearray(b"".join(encode_frame(FrameType.DATA, 1, 17, None, b"x" * 100)))
                struct.pack_into(">I", frame, 0, 50)
                ws.send_frame(0x2, bytes(frame))
            elif case == "header_len":
                frame = bytearray(b"".join(encode_frame(FrameType.DATA, 1, 17, None, b"x" * 100)))
                struct.pack_into(">H", frame, 4, 5000)
                ws.send_frame(0x2, bytes(frame))
            else:
                big = b"".join(encode_frame(FrameType.DATA, 1, 17, None, bytes(MIB + 1)))
                ws.send_frame(0x2, big)
            assert ws.wait_close_code() == code
            assert ws.closed_by_peer()
            wait_until(lambda: reason in caplog.text, what=f"logged reason {reason!r}")
        wait_until(lambda: server.find_endpoint("raw-1") is None, what="raw-1 gone")
    finally:
        ws.close()
    client.send_message(client.find_endpoint("server"), 1, None, b"unaffected")
    assert scol.wait_for(1)[0][3] == b"unaffected"
    assert server.find_endpoint("site-1").state == EndpointState.READY


def test_peer_gone_mid_message(managers, caplog):
    server, client, scol, _, url = pair(managers)
    ws = RawWs(url)
    try:
        ws.hello("raw-1")
        assert ws.recv_frame()[0] == 0x2
        wait_ready(server, "raw-1")
        with caplog.at_level(logging.INFO, logger=LOGGER):
            ws.send_frame(0x2, b"\x00" * 1000, declared=100_000)  # promises 100,000 bytes, sends 1,000
            time.sleep(0.1)
            ws.close()
            wait_until(lambda: "middle of a message" in caplog.text, what="logged reason")
        wait_until(lambda: server.find_endpoint("raw-1") is None, what="raw-1 gone")
    finally:
        ws.close()
    client.send_message(client.find_endpoint("server"), 1, None, b"fine")
    assert scol.wait_for(1)[0][3] == b"fine"


def test_handshake_timeout_closes_silent_socket(managers, caplog):
    _, url, _ = serve(managers, params={"open_timeout": "0.3"})
    raw = RawWs(url, upgrade=False)
    try:
        with caplog.at_level(logging.INFO, logger=LOGGER):
            assert raw.closed_by_peer(3.0)
            wait_until(lambda: "no WebSocket upgrade" in caplog.text, what="logged reason")
    finally:
        raw.close()


# -- errors raised to the sender, backpressure ----------------------------------------------


def test_send_after_close_raises_commerror(managers):
    server, client, _, _, _ = pair(managers)
    [sfm_conn] = client.get_connections("server")
    conn = sfm_conn.conn
    conn.close()
    conn.close()  # idempotent
    with pytest.raises(CommError) as e:
        conn.send_frame(encode_frame(FrameType.DATA, 1, 17, None, b"late"))
    assert e.value.code == CommError.CLOSED
    wait_until(lambda: server.find_endpoint("site-1") is None or client.find_endpoint("server") is None)


def test_connect_refused_raises_commerror():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    connector = ConnectorInfo("CH-test", WebSocketDriver(), parse_url(f"ws://127.0.0.1:{port}"), Mode.ACTIVE)
    with pytest.raises(CommError) as e:
        connector.driver.connect(connector)
    assert e.value.code == CommError.CLOSED and str(port) in str(e.value)


def test_listen_on_busy_port_raises_commerror(managers):
    _, url, _ = serve(managers)
    connector = ConnectorInfo("CH-test", WebSocketDriver(), parse_url(url), Mode.PASSIVE)
    with pytest.raises(CommError) as e:
        connector.driver.listen(connector)
    assert "cannot listen" in str(e.value)


def test_slow_receiver_blocks_sender(managers):
    # The receiver's core holds at most 2 MiB; the sender's driver at most 1 MiB: the sender must
    # stall (then time out) instead of piling data up in memory.
    _server, client, scol, _, _ = pair(
        managers, client_params={"send_timeout": "1.5", "high_water": str(MIB)}, queue_bytes=2 * MIB
    )
    scol.gate = threading.Event()
    ep = client.find_endpoint("server")
    chunk = bytes(MIB)
    sent = 0
    rss0 = psutil.Process().memory_info().rss
    t0 = time.monotonic()
    with pytest.raises(CommError) as e:
        while sent < 500:
            client.send_message(ep, 1, None, chunk)
            sent += 1
    assert e.value.code == CommError.TIMEOUT
    # Kernel socket buffers, the transport buffer and two small queues: far below 500 MiB.
    assert sent < 100, f"{sent} MiB went out to a receiver that takes nothing"
    assert time.monotonic() - t0 >= 1.5
    assert psutil.Process().memory_info().rss - rss0 < 200 * MIB
    scol.gate.set()
    scol.wait_for(sent, 30)


# -- scale and cleanliness ----------------------------------------------------------------


# -- review findings: one regression test each ------------------------------------------------


class FakeWsServer:
    """A listening socket that answers one WebSocket upgrade by hand, then does what a test says."""

    def __init__(self, backlog: int = 16) -> None:
        self.ls = socket.socket()
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(backlog)
        self.port = self.ls.getsockname()[1]
        self.socks: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.stop = threading.Event()

    def accept_upgrade(self, extra: bytes = b"", rcvbuf: int | None = None) -> socket.socket:
        from websockets.utils import accept_key

        s, _ = self.ls.accept()
        self.socks.append(s)
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += s.recv(4096)
        key = next(
            line.split(b":", 1)[1].strip()
            for line in buf.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key")
        )
        s.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(key.decode()).encode() + b"\r\n\r\n" + extra
        )
        return s

    def run(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self.threads.append(t)

    def close(self) -> None:
        self.stop.set()
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self.threads:
            t.join(5)
        for s in self.socks:
            s.close()
        self.ls.close()


def _server_ws(frame: bytes) -> bytes:
    """One unmasked binary WebSocket frame (server to client), any length."""
    n = len(frame)
    if n < 126:
        return bytes((0x82, n)) + frame
    if n < 65536:
        return struct.pack("!BBH", 0x82, 126, n) + frame
    return struct.pack("!BBQ", 0x82, 127, n) + frame


def _connect_in_thread(driver: WebSocketDriver, params: dict) -> tuple[threading.Thread, list, list]:
    from sfm_core.driver import ConnMonitor, ConnState

    conns: list = []
    errors: list = []

    class Mon(ConnMonitor):
        def state_change(self, c):
            if c.state == ConnState.CONNECTED:
                conns.append(c)

    driver.register_conn_monitor(Mon())
    connector = ConnectorInfo("CH-test", driver, params, Mode.ACTIVE)

    def run() -> None:
        try:
            driver.connect(connector)
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, conns, errors


def test_empty_continuation_frames_are_capped(managers, monkeypatch):
    from sfm_driver_websocket import connection

    monkeypatch.setattr(connection, "MAX_FRAGMENTS", 1000, raising=False)
    server, url, _ = serve(managers)
    ws = RawWs(url)
    try:
        ws.hello("raw-1")
        assert ws.recv_frame()[0] == 0x2
        ws.send_frame(0x2, b"", fin=False)
        ws.sock.sendall(b"\x00\x80\x00\x00\x00\x00" * 1001)  # empty non-final continuations
        assert ws.wait_close_code() == 1009
        assert ws.closed_by_peer()
    finally:
        ws.close()


def test_first_message_is_limited_to_the_handshake_size(managers, caplog):
    from sfm_core.frames import HANDSHAKE_MAX_FRAME

    server, url, col = serve(managers)
    ws = RawWs(url)
    try:
        with caplog.at_level(logging.INFO, logger=LOGGER):
            ws.send_frame(0x2, b"", declared=HANDSHAKE_MAX_FRAME + 1)  # only the header: refused at once
            assert ws.wait_close_code() == 1009
            assert ws.closed_by_peer()
            wait_until(lambda: "first message too big" in caplog.text, what="logged reason")
    finally:
        ws.close()
    # After the first message the full max_frame_size applies, even in the same read.
    ws = RawWs(url)
    try:
        hello = b"".join(encode_frame(FrameType.HELLO, 0, 1, None, build_handshake("raw-2", {})))
        big = b"".join(encode_frame(FrameType.DATA, 1, 17, None, b"b" * (2 * MIB)))
        head = [struct.pack("!BB", 0x82, 0x80 | len(hello)), struct.pack("!BBQ", 0x82, 0x80 | 127, len(big))]
        ws.sock.sendall(head[0] + b"\0" * 4 + hello + head[1] + b"\0" * 4 + big)
        assert ws.recv_frame()[0] == 0x2
        assert col.wait_for(1)[0][3] == b"b" * (2 * MIB)
    finally:
        ws.close()


def test_pause_asked_while_taking_early_frames_is_kept(managers):
    # Client side: the READY and many frames come with the upgrade response, before
    # add_connection; delivering them fills the lane (which pauses reading); start_reading must
    # not resume reading after that.
    fake = FakeWsServer()
    data = _server_ws(b"".join(encode_frame(FrameType.DATA, 1, 17, None, b"x")))
    ready = _server_ws(b"".join(encode_frame(FrameType.READY, 0, 1, None, build_handshake("server", {}))))

    def serve_fast() -> None:
        s = fake.accept_upgrade(ready + data * 300)
        s.settimeout(0.2)
        while not fake.stop.is_set():
            try:
                s.sendall(data * 1000)
            except TimeoutError:
                continue
            except OSError:
                return

    fake.run(serve_fast)
    entered = threading.Event()

    class Stuck(Collector):
        def process_message(self, *args) -> None:
            entered.set()  # a delivery thread holds the lane's first batch from here on
            super().process_message(*args)

    col = Stuck()
    col.gate = threading.Event()  # a receiver that is stuck
    try:
        client = managers("site-1", queue_frames=100)
        client.register_message_receiver(1, col)
        client.add_connector(f"ws://127.0.0.1:{fake.port}", {}, Mode.ACTIVE)
        client.start()
        wait_until(lambda: client.sfm_conns, what="connection")
        [sc] = list(client.sfm_conns.values())
        # Paused by the full lane (queue_frames=100), not just held until add_connection.
        wait_until(lambda: sc.lane.paused and not sc.conn.transport.is_reading(), 2.0, what="lane full, paused")
        # On a loaded machine the delivery thread may take its first batch only now, which
        # shrinks the queue: count from when it is stuck inside the receiver.
        assert entered.wait(scaled(5)), "no delivery thread reached the receiver"
        queued = sc.lane.queued
        time.sleep(0.3)
        assert not sc.conn.transport.is_reading()
        # The lane may overshoot its limit by what one read brought in (a busy machine lets
        # more pile up in the socket first), but it must stop growing while the server goes on.
        assert sc.lane.queued == queued
        assert queued < 256 * 1024 // len(data) + 400
    finally:
        col.gate.set()
        fake.close()


def test_close_from_peer_without_tcp_close_ends_after_close_timeout():
    fake = FakeWsServer()

    def close_but_keep_tcp() -> None:
        s = fake.accept_upgrade()
        time.sleep(0.1)
        s.sendall(b"\x88\x02" + struct.pack("!H", 1001))  # Close 1001, and no FIN ever
        while not fake.stop.is_set():
            try:
                if not s.recv(65536):
                    return
            except OSError:
                return

    fake.run(close_but_keep_tcp)
    driver = WebSocketDriver()
    try:
        t0 = time.monotonic()
        t, conns, _ = _connect_in_thread(driver, {"host": "127.0.0.1", "port": fake.port, "close_timeout": "0.3"})
        t.join(2.0)
        assert not t.is_alive(), "connect() still blocked after the peer's Close + close_timeout"
        assert time.monotonic() - t0 < 2.0 and conns
    finally:
        driver.shutdown()
        fake.close()


def test_graceful_close_sends_accepted_frames_first():
    fake = FakeWsServer()
    go = threading.Event()
    result: dict = {}

    def slow_reader() -> None:
        s = fake.accept_upgrade(rcvbuf=65536)
        go.wait(10)
        s.settimeout(5)
        buf = b""
        n = 0

        def need(k: int) -> bytes:
            nonlocal buf
            while len(buf) < k:
                chunk = s.recv(1 << 20)
                if not chunk:
                    raise EOFError
                buf += chunk
            out, buf = buf[:k], buf[k:]
            return out

        try:
            while True:
                b0, b1 = need(2)
                ln = b1 & 0x7F
                if ln == 126:
                    (ln,) = struct.unpack("!H", need(2))
                elif ln == 127:
                    (ln,) = struct.unpack("!Q", need(8))
                need(4)
                need(ln)
                if b0 & 0x0F == 8:
                    break
                n += 1
        except (EOFError, OSError):
            pass
        result["received"] = n
        s.shutdown(socket.SHUT_RDWR)  # answer the Close with the TCP close, as a server does

    fake.run(slow_reader)
    driver = WebSocketDriver()
    params = {"host": "127.0.0.1", "port": fake.port, "high_water": str(256 * 1024), "send_timeout": "0.3"}
    try:
        t, conns, _ = _connect_in_thread(driver, params)
        wait_until(lambda: conns, what="connected")
        conn = conns[0]
        frame = encode_frame(FrameType.DATA, 1, 17, None, bytes(100_000))
        accepted = 0
        with pytest.raises(CommError):
            while accepted < 1000:
                conn.send_frame(list(frame))
                accepted += 1
        assert conn._queue, "nothing left queued: the test did not fill the driver's queue"
        conn.close()
        time.sleep(0.1)
        go.set()
        t.join(5)
        wait_until(lambda: "received" in result, what="peer done")
        assert result["received"] == accepted
    finally:
        go.set()
        driver.shutdown()
        fake.close()


def _full_backlog() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full: further SYNs are dropped (the TCP connect hangs)."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(0)
    port = ls.getsockname()[1]
    fill = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fill.append(s)
    time.sleep(0.1)
    return ls, fill


def test_shutdown_stops_a_connect_in_the_tcp_phase():
    ls, fill = _full_backlog()
    driver = WebSocketDriver()
    try:
        port = ls.getsockname()[1]
        t, _, errors = _connect_in_thread(driver, {"host": "127.0.0.1", "port": port, "connect_timeout": "8"})
        time.sleep(0.3)
        t0 = time.monotonic()
        driver.shutdown()
        t.join(3)
        assert not t.is_alive() and time.monotonic() - t0 < 2.0
        assert isinstance(errors[0], CommError) and errors[0].code == CommError.CLOSED
    finally:
        for s in fill:
            s.close()
        ls.close()


def test_slow_upgrade_raises_commerror_timeout_within_connect_timeout():
    fake = FakeWsServer()
    fake.run(lambda: fake.socks.append(fake.ls.accept()[0]))  # accepts, never answers the upgrade
    driver = WebSocketDriver()
    try:
        connector = ConnectorInfo(
            "CH-test", driver, {"host": "127.0.0.1", "port": fake.port, "connect_timeout": "0.5"}, Mode.ACTIVE
        )
        t0 = time.monotonic()
        with pytest.raises(CommError) as e:
            driver.connect(connector)
        assert e.value.code == CommError.TIMEOUT
        assert time.monotonic() - t0 < 1.5
    finally:
        fake.close()


# -- urgent control frames, drain, frames dropped unsent --------------------------------------

URGENT = b"".join(encode_frame(FrameType.PING, 0, 999, None, b"\xc0"))  # stream 999: ours, not the core's
DATA_SIZE = 100_000


class CountingReceiver(FrameReceiver):
    """Counts ``bytes_sent`` calls; hands frames on to ``inner`` (the core's receiver) if given."""

    def __init__(self, inner: FrameReceiver | None = None) -> None:
        self.inner = inner
        self.sent = 0

    def process_frame(self, frame) -> None:
        if self.inner is not None:
            self.inner.process_frame(frame)

    def process_frames(self, frames) -> None:
        if self.inner is not None:
            self.inner.process_frames(frames)

    def bytes_received(self) -> None:
        if self.inner is not None:
            self.inner.bytes_received()

    def bytes_sent(self) -> None:
        self.sent += 1


class WsFrames:
    """Reads the WebSocket frames a peer sent to a raw socket (unmasking them) as SFM frame labels."""

    def __init__(self, sock: socket.socket, buf: bytes = b"") -> None:
        self.sock = sock
        self.buf = bytearray(buf)

    def _need(self, k: int) -> bytes:
        while len(self.buf) < k:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        out = bytes(self.buf[:k])
        del self.buf[:k]
        return out

    def next_label(self) -> int | str:
        """The next frame: the ``i`` header of a DATA frame, ``"urgent"`` for ours, or the opcode name."""
        b0, b1 = self._need(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._need(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._need(8))
        key = self._need(4) if b1 & 0x80 else None
        data = self._need(n)
        if key is not None:
            data = apply_mask(data, key)
        if b0 & 0x0F != 0x2:
            return f"opcode {b0 & 0x0F}"
        frame = decode_frame(data)
        if frame.type == FrameType.PING and frame.stream_id == 999:
            return "urgent"
        return frame.headers["i"] if frame.type == FrameType.DATA else f"type {frame.type}"


@contextlib.contextmanager
def _stalled_peer(managers, side: str, **params):
    """One connection of ours (the active or the passive side) to a raw peer that reads nothing
    until the test does; yields the connection, a WsFrames on the peer's socket and a
    CountingReceiver registered on the connection."""
    params = {"high_water": str(256 * 1024), "send_timeout": "30", "close_timeout": "0.5", **params}
    if side == "client":
        fake = FakeWsServer()
        socks: list = []
        fake.run(lambda: socks.append(fake.accept_upgrade(rcvbuf=65536)))
        driver = WebSocketDriver()
        t, conns, _ = _connect_in_thread(driver, {"host": "127.0.0.1", "port": fake.port, **params})
        try:
            wait_until(lambda: conns and socks, what="connected")
            conn = conns[0]
            rx = CountingReceiver()
            conn.register_frame_receiver(rx)
            yield conn, WsFrames(socks[0]), rx
        finally:
            driver.shutdown()
            fake.close()
            t.join(scaled(10))
    else:
        server, url, _ = serve(managers, params=params)
        ws = RawWs(url)
        try:
            ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            ws.hello("raw-1")
            assert ws.recv_frame()[0] == 0x2  # READY
            wait_until(lambda: server.get_connections("raw-1"), what="raw-1 connected")
            conn = server.get_connections("raw-1")[0].conn
            rx = CountingReceiver(conn.frame_receiver)
            conn.register_frame_receiver(rx)
            yield conn, WsFrames(ws.sock, ws.buf), rx
        finally:
            ws.close()


class BlockedSender:
    """A thread sending 100 kB DATA frames (header ``i``) on ``conn`` until told to stop."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.sent: list[int] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.sending = False  # inside send_frame
        self.thread = threading.Thread(target=self._run, name="test-sender")
        self.thread.start()

    def _run(self) -> None:
        i = 0
        try:
            while not self.stop.is_set():
                frame = list(encode_frame(FrameType.DATA, 1, 17, {"i": i}, bytes(DATA_SIZE)))
                self.sending = True
                self.conn.send_frame(frame)
                self.sending = False
                self.sent.append(i)
                i += 1
        except CommError as e:
            self.errors.append(e)

    def _blocked(self) -> bool:
        # Writing paused (the transport buffer is above high water, the peer reads nothing) and the
        # queue too full for the next frame: the sender waits in send_frame until the peer reads.
        conn = self.conn
        full = conn._queue and conn._queued_bytes + DATA_SIZE > conn.high_water
        return bool(conn._write_paused and full and self.sending)

    def wait_blocked(self) -> tuple[int, int]:
        """Wait until the sender waits in send_frame above high water; (frames accepted, frames queued)."""
        wait_until(lambda: self._blocked() or self.errors, 20, "sender blocked above high water")
        assert not self.errors, self.errors
        with self.conn._lock:
            assert self._blocked()
            return len(self.sent), len(self.conn._queue)

    def read_all(self, peer: WsFrames) -> list:
        """Stop sending, then read at the peer every frame sent (and whatever else came)."""
        self.stop.set()
        peer.sock.settimeout(scaled(10))
        labels: list = []
        while True:
            if sum(1 for x in labels if isinstance(x, int)) >= len(self.sent):
                # Everything accepted so far is read: the sender is not waiting for room.
                self.thread.join(scaled(10))
                assert not self.thread.is_alive()
                if sum(1 for x in labels if isinstance(x, int)) >= len(self.sent):
                    return labels
            labels.append(peer.next_label())

    def close(self) -> None:
        self.stop.set()
        self.thread.join(scaled(10))


@pytest.mark.parametrize("side", ["client", "server"])
def test_urgent_frame_goes_before_queued_data_while_a_sender_is_blocked(managers, side):
    with _stalled_peer(managers, side) as (conn, peer, rx):
        sender = BlockedSender(conn)
        try:
            accepted, queued = sender.wait_blocked()
            assert queued, "nothing queued in the driver: the test did not fill it"
            buffered = conn.transport.get_write_buffer_size()
            taken: list = []
            urgent = threading.Thread(target=lambda: taken.append(conn.send_urgent(URGENT)))
            urgent.start()
            urgent.join(scaled(5))
            assert taken == [True], "send_urgent blocked or refused while a sender waits above high water"
            # Written to the transport (writing is paused) while the data frames still wait.
            wait_until(
                lambda: conn.transport.get_write_buffer_size() > buffered, what="urgent frame written to the transport"
            )
            assert len(conn._queue) == queued and conn._write_paused
            labels = sender.read_all(peer)
        finally:
            sender.close()
        assert not sender.errors, sender.errors
        first_queued = accepted - queued
        assert labels == [*range(first_queued), "urgent", *range(first_queued, len(sender.sent))]
        # Writing resumed after a pause and released the sender: the core hears the peer is alive.
        assert rx.sent > 0


@pytest.mark.parametrize("side", ["client", "server"])
def test_drain_waits_until_everything_is_written(managers, side):
    with _stalled_peer(managers, side) as (conn, peer, _rx):
        sender = BlockedSender(conn)
        try:
            _, queued = sender.wait_blocked()
            # The peer reads nothing: a short drain gives up with frames still unsent.
            assert conn.drain(scaled(0.2)) >= queued > 0

            # On the loop thread drain cannot wait (the loop is the writer): it answers at once.
            async def drain_on_loop() -> int:
                return conn.drain(60.0)

            on_loop = asyncio.run_coroutine_threadsafe(drain_on_loop(), conn.loop).result(scaled(5))
            assert on_loop >= queued
            result: dict = {}
            reader = threading.Thread(target=lambda: result.update(labels=sender.read_all(peer)))
            reader.start()
            try:
                assert conn.drain(scaled(10)) == 0
            finally:
                reader.join(scaled(20))
            assert conn.drain(0) == 0
            assert result["labels"] == list(range(len(sender.sent)))
        finally:
            sender.close()


@pytest.mark.parametrize("side", ["client", "server"])
@pytest.mark.parametrize("how", ["close_timeout", "peer_reset"])
def test_frames_dropped_unsent_are_logged(managers, caplog, side, how):
    with _stalled_peer(managers, side) as (conn, peer, _rx):
        sender = BlockedSender(conn)
        try:
            _, queued = sender.wait_blocked()
            with caplog.at_level(logging.WARNING, logger=LOGGER):
                if how == "close_timeout":
                    conn.close()  # graceful: waits for the queue, but the peer never reads
                else:
                    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    peer.sock.close()  # a reset: the queued frames can never go
                sender.thread.join(scaled(10))
                assert sender.errors and sender.errors[0].code == CommError.CLOSED
                wait_until(lambda: conn.lost.is_set(), 10, "connection lost")
                wait_until(lambda: "dropped unsent" in caplog.text, what="warning about dropped frames")
            [record] = [r for r in caplog.records if "dropped unsent" in r.getMessage()]
            assert record.levelno == logging.WARNING
            message = record.getMessage()
            assert conn.name in message and f"{queued} queued frame(s)" in message, message
            # What was lost is what drain reports from then on.
            assert conn.drain(0) >= queued
        finally:
            sender.close()
