"""The fan-in clients of ``sfm bench``: many light sfm endpoints, each speaking HELLO through
the codec and waiting for READY, against one real listener (a child process).

``tcp_fanin`` and ``tls_fanin`` run in the bench's process; the WebSocket and gRPC clients
(asyncio, their own loops) run in a child: ``python -m sfm_core.bench.fanin SCHEME URL COUNT
TIMEOUT`` prints their result as one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable

from .peer import raise_nofile


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


def ws_url(url: str) -> str:
    """The WebSocket URL for an sfm ``ws://`` or ``http://`` connector URL (path ``/f3``)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    scheme = "wss" if parts.scheme in ("wss", "https") else "ws"
    return f"{scheme}://{parts.netloc}/f3"


async def _ws_fanin(url: str, count: int, timeout: float) -> dict:
    """``count`` light clients (one loop, ``websockets``) to an sfm ws listener; READY count."""
    from websockets.asyncio.client import connect

    from sfm_core.frames import FrameType, decode_frame, encode_frame
    from sfm_core.handshake import build_handshake

    target = ws_url(url)
    conns: list = []
    ready = 0
    # Connects in waves, so a burst of SYNs does not overrun the kernel's accept queue.
    gate = asyncio.Semaphore(256)

    async def one(i: int) -> None:
        nonlocal ready
        async with gate:
            ws = await connect(target, max_size=None, compression=None, ping_interval=None, open_timeout=timeout)
            conns.append(ws)
            await ws.send(b"".join(encode_frame(FrameType.HELLO, 0, 1, None, build_handshake(f"fan-{i}", {}))))
        reply = await ws.recv()
        if decode_frame(reply).type == FrameType.READY:
            ready += 1

    t0 = time.perf_counter()
    results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True), timeout)
    seconds = time.perf_counter() - t0
    errors = [r for r in results if isinstance(r, BaseException)]
    await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)
    out: dict = {"ready": ready, "seconds": seconds}
    if errors:
        out["errors"] = len(errors)
        out["first_error"] = repr(errors[0])
    return out


async def _grpc_fanin(url: str, count: int, timeout: float) -> dict:
    """``count`` light sfm endpoints over grpc.aio: each its own channel and stream, HELLO out,
    wait for READY."""
    import grpc
    from sfm_driver_grpc import wire

    from sfm_core.frames import FrameType, decode_frame, encode_frame
    from sfm_core.handshake import build_handshake

    target = url.split("://", 1)[1].split("/", 1)[0]
    options = [
        ("grpc.max_send_message_length", 2**31 - 1),
        ("grpc.max_receive_message_length", 2**31 - 1),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(count)]
    calls = []

    async def one(i: int, ch) -> None:
        call = ch.stream_stream("/streamer.Streamer/Stream")()
        calls.append(call)
        hello = encode_frame(FrameType.HELLO, 0, 1, None, build_handshake(f"fan-{i}", {}), sequence=1)
        await call.write(wire.encode(1, hello))
        reply = await call.read()
        if reply is grpc.aio.EOF:
            raise ConnectionError("stream ended before READY")
        _seq, data = wire.decode(reply)
        if decode_frame(data).type != FrameType.READY:
            raise ConnectionError("first frame back is not READY")

    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(one(i, ch)) for i, ch in enumerate(channels)]
    try:
        done, _ = await asyncio.wait(tasks, timeout=timeout)
        ready = sum(1 for t in done if t.exception() is None)
        return {"ready": ready, "seconds": time.perf_counter() - t0}
    finally:
        for call in calls:
            call.cancel()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*(ch.close() for ch in channels), return_exceptions=True)


#: The clients run in a child process, by scheme.
_CHILD = {"ws": _ws_fanin, "http": _ws_fanin, "grpc": _grpc_fanin}


def in_child(scheme: str) -> Callable[[str, int, float], dict]:
    """A fan-in client that runs ``scheme``'s light clients in a child process."""

    def clients(url: str, count: int, timeout: float) -> dict:
        cmd = [sys.executable, "-m", "sfm_core.bench.fanin", scheme, url, str(count), str(timeout)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 60, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"fan-in child for {scheme} failed ({out.returncode}): {out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    return clients


def client_for(scheme: str) -> Callable[[str, int, float], dict] | None:
    """The fan-in client of a plain ``scheme``, or None if the bench has none for it."""
    if scheme == "tcp":
        return tcp_fanin
    return in_child(scheme) if scheme in _CHILD else None


def main(argv: list[str] | None = None) -> None:
    """``python -m sfm_core.bench.fanin SCHEME URL COUNT TIMEOUT``: one JSON line."""
    scheme, url, count, timeout = argv if argv is not None else sys.argv[1:]
    raise_nofile()
    result = asyncio.run(_CHILD[scheme](url, int(count), float(timeout)))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
