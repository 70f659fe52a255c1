"""The WebSocket driver (ws://, http://) over real sockets on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time

import psutil
import pytest
from helpers import Collector, wait_ready, wait_until

from sfm_core import CommError, ConnectorInfo, ConnManager, Endpoint, EndpointState, Mode
from sfm_core.frames import FrameType, encode_frame
from sfm_core.handshake import build_handshake
from sfm_core.url import parse_url

pytest.importorskip("sfm_driver_websocket")
from sfm_driver_websocket import WebSocketDriver
from sfm_driver_websocket.bench import WebSocketBaseline

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
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

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


@pytest.mark.parametrize("scheme", ["ws", "http"])
def test_messages_both_ways_and_properties(managers, scheme):
    server, client, scol, ccol, url = pair(managers, scheme)
    assert url.startswith(f"{scheme}://127.0.0.1:")
    to_server = client.find_endpoint("server")
    assert to_server.properties["role"] == "server"
    props = to_server.conn_props
    assert props["peer_addr"] == f"127.0.0.1:{parse_url(url)['port']}"
    assert props["local_addr"].startswith("127.0.0.1:")
    back = server.find_endpoint("site-1")
    assert back.properties["role"] == "site-1"
    assert back.conn_props["peer_addr"] == props["local_addr"]
    assert back.conn_props["local_addr"] == props["peer_addr"]

    client.send_message(to_server, 1, {"k": "v", "n": 3, "b": b"\x00"}, b"payload")
    client.send_message(to_server, 1, None, None)
    server.send_message(back, 1, {"x": [1, 2]}, [b"multi", memoryview(b"-buffer")])
    (_, app, headers, payload, ptype), (_, _, h2, p2, _) = scol.wait_for(2)
    assert (app, headers, payload, ptype) == (1, {"k": "v", "n": 3, "b": b"\x00"}, b"payload", memoryview)
    assert (h2, p2) == (None, None)
    [(sender, _, headers, payload, _)] = ccol.wait_for(1)
    assert (sender, headers, payload) == ("server", {"x": [1, 2]}, b"multi-buffer")


def test_big_messages_both_directions(managers):
    server, client, scol, ccol, _ = pair(managers)
    # Above 4 MiB from the active side: where NVFlare's http client stops.
    up = os.urandom(5 * MIB) + b"u"
    down = os.urandom(8 * MIB)
    client.send_message(client.find_endpoint("server"), 1, {"i": 1}, up)
    client.send_message(client.find_endpoint("server"), 1, {"i": 2}, bytes(8 * MIB))
    server.send_message(server.find_endpoint("site-1"), 1, None, down)
    msgs = scol.wait_for(2, 20)
    assert msgs[0][3] == up and msgs[1][3] == bytes(8 * MIB)
    assert ccol.wait_for(1, 20)[0][3] == down


def test_order_is_kept(managers):
    _server, client, scol, _ccol, _ = pair(managers)
    ep = client.find_endpoint("server")
    sizes = [10, 100_000, 1, 70_000, 0]
    for i in range(3000):
        client.send_message(ep, 1, {"i": i}, bytes(sizes[i % len(sizes)]))
    msgs = scol.wait_for(3000, 30)
    assert [m[2]["i"] for m in msgs] == list(range(3000))
    assert [len(m[3] or b"") for m in msgs[:5]] == sizes


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


def test_stop_leaves_no_threads_or_fds(managers):
    proc = psutil.Process()
    threads0 = {t.ident for t in threading.enumerate()}
    fds0 = proc.num_fds()
    server, client, scol, _, _ = pair(managers)
    client.send_message(client.find_endpoint("server"), 1, None, b"x")
    scol.wait_for(1)
    client.stop()
    server.stop()
    wait_until(lambda: {t.ident for t in threading.enumerate()} <= threads0, what="threads gone")
    wait_until(lambda: proc.num_fds() <= fds0, what="fds closed")
    assert not [t for t in threading.enumerate() if t.name == "sfm-aio"]


def test_listener_stop_makes_client_reconnect(managers):
    server, client, _, _, url = pair(managers)
    # A second server on the same port after the first stops: the client comes back by itself.
    port = parse_url(url)["port"]
    server.stop()
    wait_until(lambda: client.find_endpoint("server") is None, what="client notices")
    again = ConnManager(Endpoint("server"))
    try:
        h = again.add_connector(f"ws://127.0.0.1:{port}", {}, Mode.PASSIVE)
        again.start()
        again.wait_listening(h)
        wait_ready(client, "server", 10)
    finally:
        again.stop()


def test_many_concurrent_clients_all_ready(managers):
    _server, url, _ = serve(managers)
    result = WebSocketBaseline("websockets").fanin(url, 250, 30.0)
    assert result["ready"] == 250, result
    assert not result.get("errors")
