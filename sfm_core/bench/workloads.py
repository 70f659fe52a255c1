"""Parent-side workloads of ``sfm bench``: each returns measured numbers, nothing is assumed."""

from __future__ import annotations

import json
import select
import statistics
import struct
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from . import raw
from .peer import raise_nofile

if TYPE_CHECKING:
    from sfm_core.pki import Pki

_LEN = struct.Struct(">I")


class PeerProcess:
    """A ``python -m sfm_core.bench.peer`` child speaking JSON lines."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sfm_core.bench.peer", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def read(self, timeout: float = 120.0) -> dict:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"bench peer {self.proc.args[3:]} said nothing for {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench peer {self.proc.args[3:]} exited with {self.proc.wait()}")
        return json.loads(line)

    def write(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            if self.proc.stdout:
                self.proc.stdout.close()

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def percentiles(samples: list[float]) -> dict:
    samples = sorted(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return {"p50_us": statistics.median(samples) * 1e6, "p99_us": p99 * 1e6}


# -- raw sockets -------------------------------------------------------------------------


def _raw_connect(port: int):
    import socket

    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def raw_oneway(size: int, count: int) -> float:
    """Seconds the receiver took for ``count - 1`` messages after the first."""
    payload = b"x" * size
    with PeerProcess("raw-recv", "--count", str(count)) as peer:
        sock = _raw_connect(peer.read()["port"])
        try:
            if size <= 64 * 1024:
                for _ in range(count):
                    sock.sendall(_LEN.pack(size) + payload)  # one send per message
            else:
                for _ in range(count):
                    raw.send_large(sock, payload)
            result = peer.read()
        finally:
            sock.close()
    return result["elapsed"]


def raw_rtt(size: int, count: int) -> dict:
    payload = b"x" * size
    with PeerProcess("raw-echo") as peer:
        sock = _raw_connect(peer.read()["port"])
        try:
            samples = []
            for _ in range(count):
                t0 = time.perf_counter()
                raw.send_message(sock, payload)
                raw.recv_message(sock)
                samples.append(time.perf_counter() - t0)
        finally:
            sock.close()
    return percentiles(samples[count // 10 :])


# -- sfm over a driver -------------------------------------------------------------------


def _peer_args(role: str, scheme: str, pki: Pki | None, *more: str) -> list[str]:
    """The peer's command line: with ``pki``, its listener presents the PKI's server certificate."""
    tls = ["--tls-dir", pki.directory] if pki is not None else []
    return [role, "--url", f"{scheme}://127.0.0.1:0", *tls, *more]


def _client(url: str, name: str = "bench-client", pki: Pki | None = None) -> Any:
    """A ConnManager connecting to ``url``, with the PKI's client certificate if given
    (its CN is ``bench-client``, the name it claims: identity binding holds)."""
    from sfm_core import ConnManager, Endpoint, Mode

    manager = ConnManager(Endpoint(name))
    manager.add_connector(url, dict(pki.client) if pki is not None else {}, Mode.ACTIVE)
    return manager


def _wait_ready(manager: Any, name: str, timeout: float = 30.0) -> Any:
    from sfm_core import EndpointState

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ep = manager.find_endpoint(name)
        if ep is not None and ep.state == EndpointState.READY:
            return ep
        time.sleep(0.005)
    raise TimeoutError(f"{name} not READY after {timeout} s")


def sfm_oneway(scheme: str, size: int, count: int, pki: Pki | None = None, wrap_receiver: bool = False) -> float:
    """Seconds the receiver took for ``count - 1`` messages after the first. With
    ``wrap_receiver`` the receiving peer runs the pass-through ``sfm_wrap_frame_receiver``
    plugin (:mod:`.wrapper`), which must have seen every message's frames."""
    payload = b"x" * size
    more = ["--count", str(count), *(["--wrap-receiver"] if wrap_receiver else [])]
    with PeerProcess(*_peer_args("sfm-recv", scheme, pki, *more)) as peer:
        url = peer.read()["url"]
        manager = _client(url, pki=pki)
        manager.start()
        try:
            server = _wait_ready(manager, "bench-server")
            send = manager.send_message
            for _ in range(count):
                send(server, 1, None, payload)
            result = peer.read()
        finally:
            manager.stop()
    if wrap_receiver and result.get("wrapped_frames", 0) < count:
        raise RuntimeError(f"the receiver wrapper saw {result.get('wrapped_frames', 0)} frames of {count} messages")
    return result["elapsed"]


def sfm_rtt(scheme: str, size: int, count: int, pki: Pki | None = None) -> dict:
    from sfm_core import MessageReceiver

    payload = b"x" * size
    samples: list[float] = []
    done = threading.Event()
    with PeerProcess(*_peer_args("sfm-echo", scheme, pki)) as peer:
        url = peer.read()["url"]
        manager = _client(url, pki=pki)
        state = {"t0": 0.0}

        class PingPong(MessageReceiver):
            # Driven from the receiver, as a request/response app would be: no extra thread hop.
            def process_message(self, endpoint, connection, app_id, message) -> None:
                now = time.perf_counter()
                samples.append(now - state["t0"])
                if len(samples) >= count:
                    done.set()
                    return
                state["t0"] = time.perf_counter()
                manager.send_message(endpoint, 1, None, payload)

        manager.register_message_receiver(1, PingPong())
        manager.start()
        try:
            server = _wait_ready(manager, "bench-server")
            state["t0"] = time.perf_counter()
            manager.send_message(server, 1, None, payload)
            if not done.wait(120):
                raise TimeoutError("ping-pong did not finish")
        finally:
            manager.stop()
    return percentiles(samples[count // 10 :])


def tcp_fanin(url: str, count: int, timeout: float, in_flight: int = 1000) -> dict:
    """``count`` light TCP clients, each speaking HELLO through the codec and waiting for READY.

    At most ``in_flight`` clients are connecting or handshaking at once, as when a crowd of
    sites ramps up: beyond the listener's accept queue (net.core.somaxconn, 4096 here) the
    kernel would drop SYNs and the clients would wait out 1 s retransmit timers instead.
    """
    import selectors
    import socket

    from sfm_core.frames import FrameDecoder, FrameType, decode_frame, encode_frame
    from sfm_core.handshake import build_handshake
    from sfm_core.url import parse_url

    raise_nofile()
    params = parse_url(url)
    addr = (params.get("host", "127.0.0.1"), params["port"])
    sel = selectors.DefaultSelector()
    socks = []
    ready = 0
    started = 0
    start = time.perf_counter()
    deadline = time.monotonic() + timeout
    try:
        while ready < count and time.monotonic() < deadline:
            while started < count and started - ready < in_flight:
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(addr)
                socks.append(s)
                hello = b"".join(encode_frame(FrameType.HELLO, 0, 1, None, build_handshake(f"fan-{started}", {})))
                sel.register(s, selectors.EVENT_WRITE, [hello, FrameDecoder(buffer_size=4096, large_frame=2048)])
                started += 1
            for key, events in sel.select(0.5):
                s = key.fileobj
                hello, decoder = key.data
                if events & selectors.EVENT_WRITE and hello:
                    try:
                        s.send(hello)
                    except OSError:
                        continue
                    key.data[0] = b""
                    sel.modify(s, selectors.EVENT_READ, key.data)
                elif events & selectors.EVENT_READ:
                    try:
                        data = s.recv(4096)
                    except OSError:
                        continue
                    for frame in decoder.feed(data):
                        if decode_frame(frame).type == FrameType.READY:
                            ready += 1
                            sel.unregister(s)
        seconds = time.perf_counter() - start
    finally:
        sel.close()
        for s in socks:
            s.close()
    return {"ready": ready, "seconds": seconds}


def tls_fanin(url: str, count: int, timeout: float, *, tls: dict, in_flight: int = 100) -> dict:
    """``count`` light TLS clients (one asyncio loop), each claiming ``fan-N`` in a HELLO built
    through the codec and waiting for READY; at most ``in_flight`` connecting or handshaking
    at once. All present the same client certificate (``tls``: client TLS params), so the
    listener needs an identity map taking ``fan-`` names to its CN. Connections stay open
    until the last is READY (or ``timeout``)."""
    import asyncio

    from sfm_core.frames import FrameDecoder, FrameType, decode_frame, encode_frame
    from sfm_core.handshake import build_handshake
    from sfm_core.tls import TlsSettings
    from sfm_core.url import parse_url

    raise_nofile()
    params = parse_url(url)
    host, port = params.get("host", "127.0.0.1"), params["port"]
    scheme = params["scheme"]
    ctx = TlsSettings({**tls, "scheme": scheme}, server=False, scheme=scheme, driver="bench").client_context()

    async def one(i: int, gate: asyncio.Semaphore, writers: list) -> bool:
        async with gate:
            reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
            writers.append(writer)
            writer.write(b"".join(encode_frame(FrameType.HELLO, 0, 1, None, build_handshake(f"fan-{i}", {}))))
            decoder = FrameDecoder(buffer_size=4096, large_frame=2048)
            while True:
                data = await reader.read(4096)
                if not data:
                    return False
                for frame in decoder.feed(data):
                    if decode_frame(frame).type == FrameType.READY:
                        return True

    async def crowd() -> dict:
        gate = asyncio.Semaphore(in_flight)
        writers: list = []
        start = time.perf_counter()
        tasks = [asyncio.ensure_future(one(i, gate, writers)) for i in range(count)]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        seconds = time.perf_counter() - start
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # retrieves refusals and cancellations
        ready = sum(1 for t in done if not t.cancelled() and t.exception() is None and t.result())
        for writer in writers:
            writer.transport.abort()  # no close_notify round trips: the listener just sees them go
        await asyncio.sleep(0)
        return {"ready": ready, "seconds": seconds}

    return asyncio.run(crowd())


def sfm_fanin(
    scheme: str,
    count: int,
    timeout: float,
    clients: Any,
    pki: Pki | None = None,
    identity_map: dict[str, str] | None = None,
) -> dict:
    """Fan-in against a real ConnManager listener in a child process (with the PKI's server
    certificate and ``identity_map`` if given)."""
    more = [f"--identity-map={k}={v}" for k, v in (identity_map or {}).items()]
    with PeerProcess(*_peer_args("sfm-listen", scheme, pki, *more)) as peer:
        url = peer.read()["url"]
        result = clients(url, count, timeout)
        # The listener may still be finishing its side of the last handshakes.
        stats: dict = {}
        for _ in range(50):
            peer.write("stats")
            stats = peer.read()
            if stats["ready"] >= result["ready"]:
                break
            time.sleep(0.1)
    return {**result, "rss": stats.get("rss", 0), "threads": stats.get("threads", 0)}
