"""Bare-library WebSocket baselines for ``sfm bench`` (hook ``sfm_bench_baseline``).

The receiving/echoing side is a child process (``python -m sfm_driver_websocket.bench serve``),
the sending side runs in this process on a private asyncio loop, both on 127.0.0.1. Each
connection starts with one text control message, ``"<workload> <count>"``; then:

* ``rate``/``throughput``: the client sends ``count`` binary messages; the server answers with a
  text message ``"<seconds from first to last message>"`` when it has them all;
* ``rtt``: the server echoes each binary message.

MB/s is 10**6 bytes per second. ``fanin`` opens many light clients in a child process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

LIBRARIES = ("websockets", "aiohttp")
_MAX = 2 * 1024**3 - 2 * 1024**2  # the core's frame limit; the bare runs allow the same
_PATH = "/f3"


def _new_loop() -> asyncio.AbstractEventLoop:
    if os.environ.get("SFM_UVLOOP") == "1":
        try:
            import uvloop

            return uvloop.new_event_loop()
        except ImportError:
            pass
    return asyncio.new_event_loop()


def _run_in_thread(make: Callable[[], Awaitable[Any]]) -> Any:
    """Run a coroutine on a fresh loop in a fresh thread (safe even if the caller has a loop)."""
    result: dict = {}

    def target() -> None:
        loop = _new_loop()
        try:
            result["value"] = loop.run_until_complete(make())
        except BaseException as e:  # handed back to the caller below
            result["error"] = e
        finally:
            loop.close()

    t = threading.Thread(target=target, name="sfm-ws-bench")
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


# -- the library adapters: connect / send / recv / close with the same shape ---------------


class _Client:
    async def send(self, data: Any) -> None: ...
    async def send_text(self, text: str) -> None: ...
    async def recv(self) -> Any: ...
    async def close(self) -> None: ...


class _WebsocketsClient(_Client):
    def __init__(self, ws: Any) -> None:
        self.ws = ws

    @classmethod
    async def connect(cls, url: str) -> _WebsocketsClient:
        from websockets.asyncio.client import connect

        return cls(await connect(url, max_size=_MAX, compression=None, ping_interval=None))

    async def send(self, data: Any) -> None:
        await self.ws.send(data)

    async def send_text(self, text: str) -> None:
        await self.ws.send(text)

    async def recv(self) -> Any:
        return await self.ws.recv()

    async def close(self) -> None:
        await self.ws.close()


class _AiohttpClient(_Client):
    def __init__(self, session: Any, ws: Any) -> None:
        self.session = session
        self.ws = ws

    @classmethod
    async def connect(cls, url: str) -> _AiohttpClient:
        import aiohttp

        session = aiohttp.ClientSession()
        try:
            ws = await session.ws_connect(url, max_msg_size=_MAX, compress=0, autoping=False)
        except BaseException:
            await session.close()
            raise
        return cls(session, ws)

    async def send(self, data: Any) -> None:
        await self.ws.send_bytes(data)

    async def send_text(self, text: str) -> None:
        await self.ws.send_str(text)

    async def recv(self) -> Any:
        msg = await self.ws.receive()
        return msg.data

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()


async def _connect(lib: str, url: str) -> _Client:
    if lib == "websockets":
        return await _WebsocketsClient.connect(url)
    return await _AiohttpClient.connect(url)


# -- the server side (child process) --------------------------------------------------------


async def _serve_session(recv: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]) -> None:
    control = await recv()
    workload, count = control.split()
    count = int(count)
    if workload == "rtt":
        for _ in range(count):
            await send(await recv())
        return
    await recv()
    first = time.perf_counter()
    for _ in range(count - 1):
        await recv()
    await send(repr(time.perf_counter() - first))


async def _serve(lib: str) -> None:
    done = asyncio.Event()
    if lib == "websockets":
        from websockets.asyncio.server import serve

        async def handler(ws: Any) -> None:
            try:
                await _serve_session(ws.recv, ws.send)
            finally:
                done.set()

        server = await serve(handler, "127.0.0.1", 0, max_size=_MAX, compression=None, ping_interval=None)
        port = server.sockets[0].getsockname()[1]
    else:
        from aiohttp import WSMsgType, web

        async def handle(request: Any) -> Any:
            ws = web.WebSocketResponse(max_msg_size=_MAX, compress=False, autoping=False)
            await ws.prepare(request)

            async def recv() -> Any:
                msg = await ws.receive()
                if msg.type not in (WSMsgType.BINARY, WSMsgType.TEXT):
                    raise ConnectionError(f"unexpected {msg.type}")
                return msg.data

            async def send(data: Any) -> None:
                if isinstance(data, str):
                    await ws.send_str(data)
                else:
                    await ws.send_bytes(data)

            try:
                await _serve_session(recv, send)
                await ws.receive()  # wait for the client's close
            finally:
                done.set()
            return ws

        app = web.Application()
        app.router.add_get(_PATH, handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # aiohttp has no public accessor
        server = runner
    print(port, flush=True)
    await asyncio.wait_for(done.wait(), 600)
    if lib == "websockets":
        server.close()
        await server.wait_closed()
    else:
        await server.cleanup()


# -- the client side (this process) ----------------------------------------------------------


async def _client_run(lib: str, url: str, workload: str, size: int, count: int) -> dict:
    client = await _connect(lib, url)
    payload = os.urandom(size)
    try:
        await client.send_text(f"{workload} {count}")
        if workload == "rtt":
            samples = []
            for _ in range(count):
                t0 = time.perf_counter()
                await client.send(payload)
                await client.recv()
                samples.append(time.perf_counter() - t0)
            samples.sort()
            return {
                "p50_us": samples[len(samples) // 2] * 1e6,
                "p99_us": samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e6,
            }
        t0 = time.perf_counter()
        for _ in range(count):
            await client.send(payload)
        receiver_seconds = float(await client.recv())
        total = time.perf_counter() - t0
        if workload == "rate":
            return {"msgs_per_s": (count - 1) / receiver_seconds if receiver_seconds > 0 else float("inf")}
        return {"mb_per_s": size * count / total / 1e6}
    finally:
        await client.close()


class WebSocketBaseline:
    """One bare WebSocket library, echo/sink between two processes (see module docstring)."""

    def __init__(self, lib: str = "websockets") -> None:
        if lib not in LIBRARIES:
            raise ValueError(f"unknown WebSocket library {lib!r}; known: {', '.join(LIBRARIES)}")
        self.lib = lib
        from importlib.metadata import version

        self.name = f"bare {lib} {version(lib)}"

    def run(self, workload: str, size: int, count: int) -> dict:
        """Run ``rate``, ``throughput`` or ``rtt`` (see module docstring) against a child process."""
        if workload not in ("rate", "throughput", "rtt"):
            raise ValueError(f"unknown workload {workload!r}")
        proc = subprocess.Popen(
            [sys.executable, "-m", "sfm_driver_websocket.bench", "serve", "--lib", self.lib],
            stdout=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"bench server for {self.lib} did not start (exit {proc.wait()})")
            url = f"ws://127.0.0.1:{int(line)}{_PATH}"
            return _run_in_thread(lambda: _client_run(self.lib, url, workload, size, count))
        finally:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()

    def fanin(self, url: str, count: int, timeout: float) -> dict:
        """``count`` light clients in one child process send HELLO to the sfm listener at ``url``."""
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "sfm_driver_websocket.bench",
                "fanin",
                "--url",
                url,
                "--count",
                str(count),
                "--timeout",
                str(timeout),
            ],
            capture_output=True,
            timeout=timeout + 60,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"fanin child failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-2000:]}"
            )
        return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def ws_url(url: str) -> str:
    """The WebSocket URL for an sfm ``ws://`` or ``http://`` connector URL (path ``/f3``)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    scheme = "wss" if parts.scheme in ("wss", "https") else "ws"
    return f"{scheme}://{parts.netloc}{_PATH}"


async def _fanin(url: str, count: int, timeout: float) -> dict:
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


def main(argv: list[str] | None = None) -> None:
    """Child-process entry: ``serve --lib L`` or ``fanin --url U --count N --timeout T``."""
    p = argparse.ArgumentParser(prog="python -m sfm_driver_websocket.bench")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--lib", choices=LIBRARIES, default="websockets")
    f = sub.add_parser("fanin")
    f.add_argument("--url", required=True)
    f.add_argument("--count", type=int, required=True)
    f.add_argument("--timeout", type=float, default=60.0)
    c = sub.add_parser("compare", help="measure every library (the table in docs/drivers/websocket.md)")
    c.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    loop = _new_loop()
    try:
        if args.cmd == "serve":
            loop.run_until_complete(_serve(args.lib))
        elif args.cmd == "fanin":
            sys.stdout.write(json.dumps(loop.run_until_complete(_fanin(args.url, args.count, args.timeout))) + "\n")
        else:
            compare(quick=args.quick)
    finally:
        loop.close()


WORKLOADS = (
    ("rate", 100, 50_000),
    ("throughput", 1024 * 1024, 300),
    ("throughput", 64 * 1024 * 1024, 6),
    ("rtt", 100, 3_000),
)


def compare(quick: bool = False) -> None:
    """Print one JSON line per library and workload."""
    for workload, size, count in WORKLOADS:
        for lib in LIBRARIES:
            n = max(3, count // 10) if quick else count
            result = WebSocketBaseline(lib).run(workload, size, n)
            sys.stdout.write(json.dumps({"lib": lib, "workload": workload, "size": size, "count": n, **result}) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
