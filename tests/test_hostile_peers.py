"""Hostile peers against a listener of every scheme, plain and TLS: they cannot disturb a
good client beyond a stated bound, and they are themselves closed.

Each test runs a real listening ConnManager and a good client (a real ConnManager with an
ACTIVE connector) that keeps a request-reply loop going with it (client -> server app 1,
echoed back server -> client on app 2), timing every round trip. While the loop runs, the
hostile peers attack; the slowest round trip during the attack must stay under
``GOOD_CLIENT_BOUND`` (``scaled(1.0)`` s), and every hostile peer must be closed within the
bound its scenario states. Scenarios, for each of tcp, stcp, ws, wss, http, https, grpc,
grpcs:

1. silent: 20 TCP connections that send nothing, closed by the listener's first timeout
   (core ``handshake_timeout`` on tcp, ``tls_handshake_timeout`` on TLS schemes,
   ``open_timeout`` on ws/http, the driver's ``handshake_timeout`` on grpc);
2. trickling: 4 peers that complete what comes before SFM (TLS, the WebSocket upgrade, or
   HTTP/2 and a gRPC stream) then start a ~1 MiB first frame and send it a byte every
   20 ms; closed by the core's ``handshake_timeout`` (on grpc the stream is ended then, and
   the connection, left without a stream, by ``idle_timeout``);
3. oversized: a first frame announcing ``HANDSHAKE_MAX_FRAME + 1`` bytes, closed at once
   (long timeouts configured, so no timeout can be what closes it); on grpc also a gRPC
   message over ``grpc.max_receive_message_length``, ended at once by gRPC itself
   (RESOURCE_EXHAUSTED). The 1 MiB + 1 case on grpc/grpcs is a strict xfail: a real defect,
   described in ``GRPC_FIRST_FRAME_DEFECT``;
4. garbage: random bytes (not TLS, not HTTP, not SFM) right after connecting, closed at once.

``h2`` is not installed, so the gRPC peers speak HTTP/2 from a small hand-made encoder
(:class:`H2Peer`: literal HPACK headers, DATA frames); the WebSocket peers write RFC 6455
frames by hand (mask key 0).
"""

from __future__ import annotations

import random
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable

import pytest
from helpers import scaled, wait_ready

from sfm_core import ConnManager, Endpoint, Message, MessageReceiver, Mode
from sfm_core.frames import HANDSHAKE_MAX_FRAME, PREFIX, FrameType
from sfm_core.url import parse_url

trustme = pytest.importorskip("trustme")
pytest.importorskip("sfm_driver_websocket")
varint = pytest.importorskip("sfm_driver_grpc.wire").varint

SCHEMES = ["tcp", "stcp", "ws", "wss", "http", "https", "grpc", "grpcs"]
TLS_SCHEMES = {"stcp", "wss", "https", "grpcs"}
WS_SCHEMES = {"ws", "wss", "http", "https"}
GRPC_SCHEMES = {"grpc", "grpcs"}

#: The slowest good-client round trip allowed while an attack goes on.
GOOD_CLIENT_BOUND = scaled(1.0)
#: Every handshake timeout of the listener in the scenarios that wait for one to fire.
SHORT = scaled(1.0)
#: Every handshake timeout in the scenarios where the peer must be closed at once: if one of
#: them fired, the test would have given up long before.
LONG = 30.0
#: What a listener may take beyond its timeout to notice and close (a scheduling margin).
MARGIN = scaled(2.0)
#: "At once": well before any timeout could fire.
AT_ONCE = scaled(5.0)


# -- certificates ----------------------------------------------------------------------------


class Pki:
    """A CA, the server's certificate (CN ``server``, SANs localhost and 127.0.0.1) and the
    good client's and the hostile peers' certificates (CN ``site-1``, ``intruder``)."""

    def __init__(self, root) -> None:
        self.root = root
        self.ca = trustme.CA()
        self.ca_file = str(root / "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)
        self.server = self._leaf("server", "localhost", "127.0.0.1")
        self.clients = {cn: self._leaf(cn, cn) for cn in ("site-1", "intruder")}

    def _leaf(self, cn: str, *identities: str) -> tuple[str, str]:
        cert = self.ca.issue_cert(*identities, common_name=cn)
        pem, key = str(self.root / f"{cn}.pem"), str(self.root / f"{cn}.key")
        cert.cert_chain_pems[0].write_to_path(pem)
        cert.private_key_pem.write_to_path(key)
        return pem, key

    def server_params(self) -> dict:
        return {"ca_cert": self.ca_file, "server_cert": self.server[0], "server_key": self.server[1]}

    def client_params(self, cn: str = "site-1") -> dict:
        return {"ca_cert": self.ca_file, "client_cert": self.clients[cn][0], "client_key": self.clients[cn][1]}

    def wrap(self, sock: socket.socket, alpn: str | None = None) -> ssl.SSLSocket:
        """``sock`` after a TLS handshake as a hostile peer holding a valid certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(self.ca_file)
        ctx.load_cert_chain(*self.clients["intruder"])
        if alpn:
            ctx.set_alpn_protocols([alpn])
        return ctx.wrap_socket(sock, server_hostname="127.0.0.1")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def listener_params(scheme: str, pki: Pki, timeout: float) -> dict:
    """Every bound a listener of ``scheme`` has on a connection before its SFM handshake, set
    to ``timeout`` (the core's own ``handshake_timeout`` is set on the ConnManager)."""
    params = pki.server_params() if scheme in TLS_SCHEMES else {}
    if scheme in TLS_SCHEMES:
        params["tls_handshake_timeout"] = timeout
    if scheme in WS_SCHEMES:
        # A closing WebSocket waits close_timeout for the peer's close frame (a hostile peer
        # sends none): SHORT in every scenario, so "at once" stays well under AT_ONCE.
        params.update(open_timeout=timeout, close_timeout=SHORT)
    if scheme in GRPC_SCHEMES:
        params.update(handshake_timeout=timeout, idle_timeout=timeout)
    return params


# -- the good client -------------------------------------------------------------------------


class Echo(MessageReceiver):
    """On the server: sends every app-1 message back to its sender on app 2."""

    def __init__(self, server: ConnManager) -> None:
        self.server = server

    def process_message(self, endpoint: Endpoint, connection, app_id: int, message: Message) -> None:
        self.server.send_message(endpoint, 2, None, bytes(message.payload))


class Prober(MessageReceiver):
    """The good client's request-reply loop, on its own thread: each round trip is timed."""

    def __init__(self, client: ConnManager, to_server: Endpoint) -> None:
        self.client, self.to_server = client, to_server
        self.rtts: list[float] = []
        self.errors: list[str] = []
        self._expect = b""
        self._replied = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-prober")
        client.register_message_receiver(2, self)

    def process_message(self, endpoint: Endpoint, connection, app_id: int, message: Message) -> None:
        if bytes(message.payload) == self._expect:
            self._replied.set()

    def _run(self) -> None:
        seq = 0
        while not self._stop.is_set():
            seq += 1
            self._expect = seq.to_bytes(8, "big")
            self._replied.clear()
            start = time.monotonic()
            try:
                self.client.send_message(self.to_server, 1, None, self._expect)
            except Exception as e:  # the test reports it
                self.errors.append(f"send {seq}: {e!r}")
                return
            if not self._replied.wait(scaled(10)):
                self.errors.append(f"no reply to request {seq} within {scaled(10)} s")
                return
            self.rtts.append(time.monotonic() - start)
            self._stop.wait(0.01)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + scaled(10)
        while not self.rtts and not self.errors and time.monotonic() < deadline:
            time.sleep(0.005)
        assert self.rtts, f"the good client got no reply before the attack: {self.errors}"

    def mark(self) -> int:
        return len(self.rtts)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def check(self, since: int, what: str) -> float:
        """The worst round trip since ``mark()`` returned ``since`` (waiting for at least 3,
        so an attack dealt with at once is followed by a few), asserted under the bound."""
        deadline = time.monotonic() + scaled(5)
        while len(self.rtts) < since + 3 and not self.errors and time.monotonic() < deadline:
            time.sleep(0.005)
        window = self.rtts[since:]
        assert not self.errors, f"{what}: the good client failed: {self.errors}"
        assert len(window) >= 3, f"{what}: only {len(window)} good-client round trips during the attack"
        worst = max(window)
        assert worst < GOOD_CLIENT_BOUND, (
            f"{what}: the good client's slowest round trip was {worst:.3f} s, over the bound of "
            f"GOOD_CLIENT_BOUND = {GOOD_CLIENT_BOUND} s ({len(window)} round trips)"
        )
        print(f"\n{what}: worst good-client round trip {worst * 1000:.1f} ms over {len(window)} round trips")
        return worst


class Rig:
    """A listener of one scheme, its good client's request-reply loop, and whatever a test
    opens (sockets, threads), all closed at teardown."""

    def __init__(self, scheme: str, pki: Pki) -> None:
        self.scheme, self.pki = scheme, pki
        self.sockets: list[socket.socket] = []
        self.threads: list[tuple[threading.Thread, threading.Event]] = []
        self.managers: list[ConnManager] = []
        self.prober: Prober | None = None

    def start(self, timeout: float) -> Rig:
        """Listen (every handshake timeout ``timeout``), connect the good client, start its loop."""
        self.server = self._manager("server", handshake_timeout=timeout, heartbeat_check=0.05)
        self.server.register_message_receiver(1, Echo(self.server))
        scheme, pki = self.scheme, self.pki
        url = f"{scheme}://127.0.0.1:0"
        handle = self.server.add_connector(url, listener_params(scheme, pki, timeout), Mode.PASSIVE)
        self.server.start()
        self.url = self.server.wait_listening(handle, scaled(10))
        self.port = parse_url(self.url)["port"]
        client = self._manager("site-1")
        client.add_connector(self.url, pki.client_params() if scheme in TLS_SCHEMES else {}, Mode.ACTIVE)
        client.start()
        self.prober = Prober(client, wait_ready(client, "server", 10))
        wait_ready(self.server, "site-1", 10)
        self.prober.start()
        return self

    def _manager(self, name: str, **kwargs) -> ConnManager:
        m = ConnManager(Endpoint(name), **kwargs)
        self.managers.append(m)
        return m

    def tcp(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=scaled(10))
        self.sockets.append(sock)
        return sock

    def thread(self, target: Callable[[threading.Event], None], name: str) -> threading.Event:
        stop = threading.Event()
        t = threading.Thread(target=target, args=(stop,), name=name)
        self.threads.append((t, stop))
        t.start()
        return stop

    def close(self) -> None:
        for t, stop in self.threads:
            stop.set()
            t.join()
        for sock in self.sockets:
            sock.close()
        if self.prober is not None:
            self.prober.stop()
        for m in reversed(self.managers):
            m.stop(linger=0)


@pytest.fixture
def rig(pki):
    """``rig(scheme, timeout)``: a :class:`Rig` whose listener's timeouts are all ``timeout``."""
    made: list[Rig] = []

    def make(scheme: str, timeout: float) -> Rig:
        made.append(Rig(scheme, pki))
        return made[-1].start(timeout)

    yield make
    for r in made:
        r.close()


# -- hostile peers: the protocols before SFM, by hand ----------------------------------------


def closed_before(sock: socket.socket, deadline: float) -> bool:
    """True once the other side closes ``sock`` (EOF or reset) before ``deadline``."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            return True
        except TimeoutError:
            return False


def ws_upgrade(sock: socket.socket) -> None:
    """The WebSocket upgrade of ``GET /f3``, answered 101."""
    sock.sendall(
        b"GET /f3 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, f"closed before the upgrade was answered: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head


def ws_header(length: int) -> bytes:
    """A masked (key 0, so the payload goes as is) final binary frame of ``length`` bytes."""
    return struct.pack("!BBQ", 0x82, 0x80 | 127, length) + b"\0\0\0\0"


def sfm_prefix(length: int) -> bytes:
    """The 16-byte prefix of a HELLO of ``length`` bytes."""
    return PREFIX.pack(length, 0, FrameType.HELLO, 0, 0, 0, 1, 1)


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_DATA, H2_HEADERS, H2_RST_STREAM, H2_SETTINGS, H2_GOAWAY = 0, 1, 3, 4, 7
H2_END_STREAM = H2_ACK = 0x1
H2_END_HEADERS = 0x4


def h2_frame(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack("!I", len(payload))[1:] + struct.pack("!BBI", ftype, flags, stream) + payload


def hpack(headers: list[tuple[str, str]]) -> bytes:
    out = bytearray()
    for name, value in headers:
        out.append(0x00)
        for s in (name.encode(), value.encode()):
            assert len(s) < 127
            out.append(len(s))
            out += s
    return bytes(out)


class H2Peer:
    """An HTTP/2 client on ``sock`` that opens stream 1 as a gRPC call to NVFlare's
    ``/streamer.Streamer/Stream`` and then sends whatever a test says as DATA."""

    def __init__(self, sock: socket.socket, scheme: str, port: int) -> None:
        self.sock = sock
        self.buf = b""
        sock.sendall(H2_PREFACE + h2_frame(H2_SETTINGS, 0, 0, b""))
        while True:  # the server's SETTINGS, to acknowledge
            ftype, flags, _, _ = self.read_frame()
            if ftype == H2_SETTINGS and not flags & H2_ACK:
                break
        headers = [
            (":method", "POST"),
            (":scheme", "https" if scheme == "grpcs" else "http"),
            (":path", "/streamer.Streamer/Stream"),
            (":authority", f"127.0.0.1:{port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        sock.sendall(h2_frame(H2_SETTINGS, H2_ACK, 0, b"") + h2_frame(H2_HEADERS, H2_END_HEADERS, 1, hpack(headers)))

    def read_frame(self) -> tuple[int, int, int, bytes]:
        while len(self.buf) < 9 or len(self.buf) < 9 + int.from_bytes(self.buf[:3], "big"):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        n = int.from_bytes(self.buf[:3], "big")
        ftype, flags, stream = struct.unpack("!BBI", self.buf[3:9])
        payload, self.buf = self.buf[9 : 9 + n], self.buf[9 + n :]
        return ftype, flags, stream & 0x7FFFFFFF, payload

    def data(self, payload: bytes) -> bytes:
        return h2_frame(H2_DATA, 0, 1, payload)

    def ended_before(self, deadline: float) -> str | None:
        """How the call ended (the stream reset or finished by the server, GOAWAY, or the
        connection closed), if it did before ``deadline``."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                ftype, flags, stream, payload = self.read_frame()
            except TimeoutError:
                return None
            except (ConnectionError, ssl.SSLError) as e:
                return f"connection closed ({e})"
            if ftype == H2_RST_STREAM and stream == 1:
                return f"RST_STREAM {payload.hex()}"
            if ftype == H2_HEADERS and stream == 1 and flags & H2_END_STREAM:
                return f"trailers {payload!r}"
            if ftype == H2_GOAWAY:
                return f"GOAWAY {payload.hex()}"


def grpc_message_prefix(length: int) -> bytes:
    """The 5-byte gRPC message prefix: not compressed, ``length`` bytes follow."""
    return b"\x00" + struct.pack("!I", length)


def open_before_sfm(rig: Rig) -> tuple[socket.socket, H2Peer | None]:
    """A connection that has done everything that comes before SFM on the rig's scheme: TLS
    (with a valid certificate), the WebSocket upgrade, or HTTP/2 and a gRPC stream."""
    sock = rig.tcp()
    if rig.scheme in TLS_SCHEMES:
        rig.sockets.remove(sock)
        sock = rig.pki.wrap(sock, alpn="h2" if rig.scheme in GRPC_SCHEMES else None)
        rig.sockets.append(sock)
    h2 = None
    if rig.scheme in WS_SCHEMES:
        ws_upgrade(sock)
    elif rig.scheme in GRPC_SCHEMES:
        h2 = H2Peer(sock, rig.scheme, rig.port)
    return sock, h2


def first_frame_start(rig: Rig, h2: H2Peer | None, length: int) -> bytes:
    """The bytes that start a first SFM frame of ``length`` bytes on the rig's scheme."""
    if rig.scheme in WS_SCHEMES:
        return ws_header(length) + sfm_prefix(length)
    if h2 is not None:  # a gRPC message holding Frame{data = <the SFM frame>}
        envelope = b"\x12" + varint(length)
        return h2.data(grpc_message_prefix(len(envelope) + length) + envelope + sfm_prefix(length))
    return sfm_prefix(length)


# -- 1. silent peers -------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_silent_peers_are_closed_and_the_good_client_is_served(scheme, rig) -> None:
    """20 TCP connections that send nothing: each is closed (EOF or reset seen) within the
    listener's first timeout (SHORT) + MARGIN, while the good client's round trips stay
    under GOOD_CLIENT_BOUND = scaled(1.0) s."""
    r = rig(scheme, SHORT)
    mark = r.prober.mark()
    silent = [r.tcp() for _ in range(20)]
    opened = time.monotonic()
    deadline = opened + SHORT + MARGIN
    kept = [i for i, sock in enumerate(silent) if not closed_before(sock, deadline)]
    took = time.monotonic() - opened
    assert not kept, f"{scheme}: silent connections {kept} still open {took:.2f} s after connecting"
    r.prober.check(mark, f"{scheme} silent x20 (all closed after {took:.2f} s)")


# -- 2. trickling peers ----------------------------------------------------------------------


def trickling_bound(scheme: str) -> float:
    """The core's handshake_timeout (SHORT) closes a trickling peer; on grpc that ends its
    stream and idle_timeout (SHORT) then closes the connection left without a stream, on
    ws the close frame goes out and close_timeout (SHORT) then ends the TCP connection."""
    return (2 if scheme in GRPC_SCHEMES | WS_SCHEMES else 1) * SHORT + MARGIN


@pytest.mark.parametrize("scheme", SCHEMES)
def test_trickling_peers_are_closed_and_the_good_client_is_served(scheme, rig) -> None:
    """4 peers do all that comes before SFM (TLS, upgrade, HTTP/2 + a gRPC stream), announce
    a 1 MiB HELLO and send it a byte every 20 ms: each is closed by the core's
    handshake_timeout (SHORT; on grpc the connection then by idle_timeout, SHORT again) +
    MARGIN, while the good client's round trips stay under GOOD_CLIENT_BOUND."""
    r = rig(scheme, SHORT)
    mark = r.prober.mark()
    peers = []
    for _ in range(4):
        sock, h2 = open_before_sfm(r)
        sock.sendall(first_frame_start(r, h2, HANDSHAKE_MAX_FRAME - 64))
        sock.settimeout(0)  # the trickle thread alone reads and writes it from now on
        peers.append((sock, h2))
    opened = time.monotonic()
    closed: dict[int, float] = {}
    all_closed = threading.Event()
    byte = peers[0][1].data(b"\0") if peers[0][1] is not None else b"\0"

    def trickle(stop: threading.Event) -> None:
        while not stop.wait(0.02) and len(closed) < len(peers):
            for i, (sock, _) in enumerate(peers):
                if i in closed:
                    continue
                try:
                    readable = isinstance(sock, ssl.SSLSocket) and sock.pending()
                    readable = readable or select.select([sock], [], [], 0)[0]
                    if readable and not sock.recv(65536):
                        raise ConnectionResetError("EOF")
                    sock.send(byte)
                except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
                except OSError:
                    closed[i] = time.monotonic() - opened
        all_closed.set()

    r.thread(trickle, "test-trickle")
    bound = trickling_bound(scheme)
    all_closed.wait(bound + scaled(1))
    closed = dict(closed)  # a snapshot: the trickle thread may still be adding to it
    took = max(closed.values(), default=0.0)
    kept = [i for i in range(len(peers)) if i not in closed or closed[i] > bound]
    assert not kept, f"{scheme}: trickling peers {kept} not closed within {bound:.2f} s (closed after: {closed})"
    r.prober.check(mark, f"{scheme} trickling x4 (all closed after {took:.2f} s)")


# -- 3. an oversized first frame -------------------------------------------------------------


GRPC_FIRST_FRAME_DEFECT = (
    "a limit of gRPC core, not fixed in the driver (docs/security.md): gRPC buffers a whole "
    "message, granting the stream window for all of it, before the driver sees it, and its only "
    "limit is the listener-wide max_receive_message_length (max_frame_size); a call whose first "
    "message announces HANDSHAKE_MAX_FRAME + 1 bytes is therefore kept until the core's "
    "handshake_timeout. Bounded by max_streams (4) per connection and max_connections; remove "
    "this xfail if gRPC gains a per-call limit the driver can use"
)
OVERSIZED = [
    pytest.param(s, HANDSHAKE_MAX_FRAME + 1, id=s)
    if s not in GRPC_SCHEMES
    else pytest.param(
        s, HANDSHAKE_MAX_FRAME + 1, id=s, marks=pytest.mark.xfail(strict=True, reason=GRPC_FIRST_FRAME_DEFECT)
    )
    for s in SCHEMES
]
#: On grpc, gRPC's own limit (max_receive_message_length, about the 2 GiB max_frame_size) too.
OVERSIZED += [pytest.param(s, 0xF000_0000, id=f"{s}-over-grpc-limit") for s in sorted(GRPC_SCHEMES)]


@pytest.mark.parametrize(("scheme", "length"), OVERSIZED)
def test_an_oversized_first_frame_is_closed_at_once(scheme, length, rig) -> None:
    """A first frame announcing ``length`` bytes (over the pre-handshake limit
    HANDSHAKE_MAX_FRAME = 1 MiB), after all that comes before SFM: closed (on grpc: the call
    ended or the connection closed) within AT_ONCE = scaled(5) s although every timeout is
    LONG (30 s), while the good client's round trips stay under GOOD_CLIENT_BOUND."""
    r = rig(scheme, LONG)
    mark = r.prober.mark()
    sock, h2 = open_before_sfm(r)
    start = time.monotonic()
    sock.sendall(first_frame_start(r, h2, length))
    if h2 is not None:
        how = h2.ended_before(start + AT_ONCE)
        assert how, f"{scheme}: a gRPC call announcing a {length}-byte first frame was kept {AT_ONCE} s"
    else:
        assert closed_before(sock, start + AT_ONCE), f"{scheme}: a {length}-byte first frame was kept {AT_ONCE} s"
        how = "closed"
    took = time.monotonic() - start
    r.prober.check(mark, f"{scheme} oversized {length} ({how[:120]} after {took:.3f} s)")


# -- 4. garbage ------------------------------------------------------------------------------


#: Not TLS (0x16 starts a handshake record), not HTTP or the HTTP/2 preface, not SFM.
GARBAGE = random.Random(1).randbytes(4096)
assert GARBAGE[0] not in b"\x16GPpg"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_garbage_is_closed_at_once(scheme, rig) -> None:
    """4 KiB of random bytes right after connecting: closed within AT_ONCE = scaled(5) s
    although every timeout is LONG (30 s), while the good client's round trips stay under
    GOOD_CLIENT_BOUND."""
    r = rig(scheme, LONG)
    mark = r.prober.mark()
    sock = r.tcp()
    start = time.monotonic()
    try:
        sock.sendall(GARBAGE)
    except (ConnectionResetError, BrokenPipeError):
        pass  # closed before all of it was taken
    assert closed_before(sock, start + AT_ONCE), f"{scheme}: a peer sending garbage was kept {AT_ONCE} s"
    took = time.monotonic() - start
    r.prober.check(mark, f"{scheme} garbage (closed after {took:.3f} s)")


# -- 5. many streams on one gRPC connection ----------------------------------------------


@pytest.mark.parametrize("scheme", sorted(GRPC_SCHEMES))
def test_a_grpc_connection_gets_at_most_max_streams_streams(scheme, rig) -> None:
    """One HTTP/2 connection opening streams 1, 3, ... 11 (six gRPC calls, none saying HELLO):
    gRPC refuses those past max_streams (4) with RST_STREAM, so one connection cannot make
    the listener buffer a first message on more than 4 streams; the good client is served."""
    r = rig(scheme, LONG)
    mark = r.prober.mark()
    sock, h2 = open_before_sfm(r)
    assert h2 is not None
    headers = hpack(
        [
            (":method", "POST"),
            (":scheme", "https" if scheme == "grpcs" else "http"),
            (":path", "/streamer.Streamer/Stream"),
            (":authority", f"127.0.0.1:{r.port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
    )
    sock.sendall(b"".join(h2_frame(H2_HEADERS, H2_END_HEADERS, sid, headers) for sid in (3, 5, 7, 9, 11)))
    refused: set[int] = set()
    deadline = time.monotonic() + AT_ONCE
    while refused != {9, 11} and time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            ftype, _flags, stream, _payload = h2.read_frame()
        except TimeoutError:
            break
        if ftype == H2_RST_STREAM:
            refused.add(stream)
    assert refused == {9, 11}, f"{scheme}: streams reset {sorted(refused)}, expected the 5th and 6th (9, 11)"
    r.prober.check(mark, f"{scheme} 6 streams on one connection")
