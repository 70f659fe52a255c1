"""Bare-grpcio baselines for ``sfm bench`` (the hook ``sfm_bench_baseline``) and the fan-in client.

Every measurement runs between two processes on 127.0.0.1: a server child
(``python -m sfm_driver_grpc.bench serve``) serving the generated ``streamer.Streamer``
service, and a client child (``... client``) that prints its result as JSON. The parent
only starts and cleans up both, so the parent's own threads and event loops (``sfm bench``
may have the shared sfm loop running) never mix with the measurement.

Stream protocol of the bench server: the first Frame chooses the mode. ``seq=1``: echo every
Frame back. ``seq=2`` with ``data=b"<count>"``: sink; after ``count`` more Frames it answers
one Frame with JSON ``{"seconds", "bytes"}`` timed at the receiver from the start Frame's
arrival to the last Frame's.

CLI (for measuring by hand)::

    python -m sfm_driver_grpc.bench table            # the sync-vs-aio table of docs/drivers/grpc.md
    python -m sfm_driver_grpc.bench run --api aio --workload rate --size 100 --count 50000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

MAX_MESSAGE = 2**31 - 1
_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]
_ECHO, _SINK, _REPORT = 1, 2, 3


def _pb():
    from .proto import streamer_pb2, streamer_pb2_grpc

    return streamer_pb2, streamer_pb2_grpc


# -- server child -----------------------------------------------------------------------


def _serve_sync(workers: int) -> None:
    from concurrent import futures

    import grpc

    pb, pbg = _pb()

    class Servicer(pbg.StreamerServicer):
        def Stream(self, request_iterator, context):
            first = next(request_iterator)
            if first.seq == _ECHO:
                yield first
                yield from request_iterator
                return
            count = int(first.data)
            start = time.perf_counter()
            total = 0
            for i, req in enumerate(request_iterator, 1):
                total += len(req.data)
                if i == count:
                    break
            report = {"seconds": time.perf_counter() - start, "bytes": total}
            yield pb.Frame(seq=_REPORT, data=json.dumps(report).encode())
            for _ in request_iterator:  # until the client ends the stream
                pass

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=_OPTIONS)
    pbg.add_StreamerServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"PORT {port}", flush=True)
    sys.stdin.read()  # the parent closes stdin to stop us
    server.stop(0)


async def _serve_aio() -> None:
    import grpc

    pb, pbg = _pb()

    class Servicer(pbg.StreamerServicer):
        async def Stream(self, request_iterator, context):
            first = await context.read()
            if first.seq == _ECHO:
                await context.write(first)
                while True:
                    req = await context.read()
                    if req is grpc.aio.EOF:
                        return
                    await context.write(req)
            count = int(first.data)
            start = time.perf_counter()
            total = 0
            for _ in range(count):
                req = await context.read()
                total += len(req.data)
            report = {"seconds": time.perf_counter() - start, "bytes": total}
            await context.write(pb.Frame(seq=_REPORT, data=json.dumps(report).encode()))
            while await context.read() is not grpc.aio.EOF:
                pass

    server = grpc.aio.server(options=_OPTIONS)
    pbg.add_StreamerServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"PORT {port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(0)


# -- client child -----------------------------------------------------------------------


def _percentiles(samples: list[float]) -> dict:
    samples.sort()
    n = len(samples)
    return {"p50_us": samples[n // 2] * 1e6, "p99_us": samples[min(n - 1, int(n * 0.99))] * 1e6}


def _result(workload: str, size: int, count: int, report: dict) -> dict:
    if workload == "rate":
        return {"msgs_per_s": count / report["seconds"]}
    return {"mb_per_s": report["bytes"] / report["seconds"] / 1e6}


def _client_sync(target: str, workload: str, size: int, count: int) -> dict:
    import grpc

    pb, pbg = _pb()
    with grpc.insecure_channel(target, options=_OPTIONS) as channel:
        stub = pbg.StreamerStub(channel)
        payload = os.urandom(size)
        if workload in ("rate", "throughput"):
            frame = pb.Frame(seq=0, data=payload)

            def gen():
                yield pb.Frame(seq=_SINK, data=str(count).encode())
                for _ in range(count):
                    yield frame
                done.wait()

            done = threading.Event()
            responses = stub.Stream(gen())
            report = json.loads(next(responses).data)
            done.set()
            responses.cancel()
            return _result(workload, size, count, report)
        q: queue.SimpleQueue = queue.SimpleQueue()

        def qgen():
            while (item := q.get()) is not None:
                yield item

        responses = stub.Stream(qgen())
        frame = pb.Frame(seq=_ECHO, data=payload)
        samples = []
        for i in range(count + 100):
            t = time.perf_counter()
            q.put(frame)
            next(responses)
            if i >= 100:  # warm-up
                samples.append(time.perf_counter() - t)
        q.put(None)
        responses.cancel()
        return _percentiles(samples)


async def _client_aio(target: str, workload: str, size: int, count: int) -> dict:
    import grpc

    pb, pbg = _pb()
    async with grpc.aio.insecure_channel(target, options=_OPTIONS) as channel:
        stub = pbg.StreamerStub(channel)
        payload = os.urandom(size)
        call = stub.Stream()
        if workload in ("rate", "throughput"):
            frame = pb.Frame(seq=0, data=payload)
            await call.write(pb.Frame(seq=_SINK, data=str(count).encode()))
            for _ in range(count):
                await call.write(frame)
            report = json.loads((await call.read()).data)
            await call.done_writing()
            return _result(workload, size, count, report)
        frame = pb.Frame(seq=_ECHO, data=payload)
        samples = []
        for i in range(count + 100):
            t = time.perf_counter()
            await call.write(frame)
            await call.read()
            if i >= 100:
                samples.append(time.perf_counter() - t)
        await call.done_writing()
        return _percentiles(samples)


async def _client_scale(target: str, streams: int, pings: int, timeout: float) -> dict:
    """``streams`` concurrent echo streams (one channel = one TCP connection each): all answered? rate?"""
    import grpc

    pb, pbg = _pb()
    options = [*_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(streams)]
    frame = pb.Frame(seq=_ECHO, data=b"x" * 100)
    calls = []
    try:
        t0 = time.perf_counter()

        async def open_one(ch):
            call = pbg.StreamerStub(ch).Stream()
            calls.append(call)
            await call.write(frame)
            await call.read()

        tasks = [asyncio.ensure_future(open_one(ch)) for ch in channels]
        done, _ = await asyncio.wait(tasks, timeout=timeout)
        ready = sum(1 for t in done if t.exception() is None)
        established = time.perf_counter() - t0
        rate = None
        if ready == streams:

            async def pingpong(call):
                for _ in range(pings):
                    await call.write(frame)
                    await call.read()

            t1 = time.perf_counter()
            await asyncio.wait_for(asyncio.gather(*(pingpong(c) for c in calls)), timeout)
            rate = streams * pings / (time.perf_counter() - t1)
        return {"ready": ready, "seconds": established, "echo_msgs_per_s": rate}
    finally:
        await _close_clients(calls, tasks, channels)


async def _close_clients(calls: list, tasks: list, channels: list) -> None:
    """Cancel the light clients' calls and tasks and close their channels."""
    for call in calls:
        call.cancel()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*(ch.close() for ch in channels), return_exceptions=True)


async def _client_fanin(url: str, count: int, timeout: float) -> dict:
    """``count`` light sfm endpoints: each its own channel and stream, HELLO out, wait for READY."""
    import grpc
    from sfm_core.frames import FrameType, decode_frame, encode_frame
    from sfm_core.handshake import build_handshake

    from . import wire

    target = url.split("://", 1)[1].split("/", 1)[0]
    options = [*_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
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
        await _close_clients(calls, tasks, channels)


# -- the baseline object ----------------------------------------------------------------


class _Server:
    """A bench server child process; stop() closes its stdin and reaps it."""

    def __init__(self, api: str, workers: int) -> None:
        cmd = [sys.executable, "-m", "sfm_driver_grpc.bench", "serve", "--api", api, "--workers", str(workers)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"bench server did not start: {line!r}")
        self.target = f"127.0.0.1:{int(line.split()[1])}"

    def stop(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            self.proc.stdout.close()


def _run_child(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, "-m", "sfm_driver_grpc.bench", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"bench child {args} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class GrpcBaseline:
    """Bare grpcio (generated stubs, no sfm) on the same ``Stream`` service: the floor's reference.

    ``api`` is ``"aio"`` (``grpc.aio``, what the driver uses) or ``"sync"`` (thread-pool server,
    ``workers`` threads: each open stream holds one for its life).
    """

    def __init__(self, api: str = "aio", workers: int = 16) -> None:
        if api not in ("aio", "sync"):
            raise ValueError(f"api must be 'aio' or 'sync', not {api!r}")
        self.api = api
        self.workers = workers
        self.name = f"bare grpcio ({'grpc.aio' if api == 'aio' else 'sync'})"

    def run(self, workload: str, size: int, count: int) -> dict:
        """One workload between two processes: ``rate``, ``throughput`` or ``rtt``."""
        if workload not in ("rate", "throughput", "rtt"):
            raise ValueError(f"unknown workload {workload!r}")
        server = _Server(self.api, self.workers)
        try:
            args = ["client", "--api", self.api, "--target", server.target]
            args += ["--workload", workload, "--size", str(size), "--count", str(count)]
            return _run_child(args, timeout=300)
        finally:
            server.stop()

    def scale(self, streams: int, pings: int = 20, timeout: float = 30.0) -> dict:
        """``streams`` concurrent streams on one server: how many are answered, and the echo rate."""
        workers = max(self.workers, streams + 8) if self.api == "sync" else self.workers
        server = _Server(self.api, workers)
        try:
            args = ["scale", "--target", server.target, "--streams", str(streams), "--pings", str(pings)]
            return _run_child([*args, "--timeout", str(timeout)], timeout=timeout * 3 + 30)
        finally:
            server.stop()

    def fanin(self, url: str, count: int, timeout: float) -> dict:
        """``count`` light sfm clients (one process, one loop) to the listener at ``url``; READY count."""
        args = ["fanin", "--url", url, "--count", str(count), "--timeout", str(timeout)]
        return _run_child(args, timeout=timeout + 60)


# -- CLI ----------------------------------------------------------------------------------


def _table() -> None:
    rows = [
        ("rate", 100, 50_000),
        ("throughput", 1024**2, 300),
        ("throughput", 64 * 1024**2, 6),
        ("rtt", 100, 3000),
    ]
    for api in ("sync", "aio"):
        b = GrpcBaseline(api)
        for workload, size, count in rows:
            print(api, workload, size, b.run(workload, size, count), flush=True)
        for n in (100, 1000):
            print(api, "scale", n, b.scale(n), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sfm_driver_grpc.bench")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--api", choices=["sync", "aio"], default="aio")
    s.add_argument("--workers", type=int, default=16)
    for name in ("client", "run"):
        c = sub.add_parser(name)
        c.add_argument("--api", choices=["sync", "aio"], default="aio")
        c.add_argument("--target", default="")
        c.add_argument("--workload", default="rate")
        c.add_argument("--size", type=int, default=100)
        c.add_argument("--count", type=int, default=10000)
    sc = sub.add_parser("scale")
    sc.add_argument("--target", required=True)
    sc.add_argument("--streams", type=int, default=1000)
    sc.add_argument("--pings", type=int, default=20)
    sc.add_argument("--timeout", type=float, default=30.0)
    f = sub.add_parser("fanin")
    f.add_argument("--url", required=True)
    f.add_argument("--count", type=int, default=1000)
    f.add_argument("--timeout", type=float, default=60.0)
    sub.add_parser("table")
    a = p.parse_args(argv)
    if a.cmd == "serve":
        if a.api == "sync":
            _serve_sync(a.workers)
        else:
            asyncio.run(_serve_aio())
    elif a.cmd == "client":
        if a.api == "sync":
            res: Any = _client_sync(a.target, a.workload, a.size, a.count)
        else:
            res = asyncio.run(_client_aio(a.target, a.workload, a.size, a.count))
        print(json.dumps(res))
    elif a.cmd == "run":
        print(json.dumps(GrpcBaseline(a.api).run(a.workload, a.size, a.count)))
    elif a.cmd == "scale":
        print(json.dumps(asyncio.run(_client_scale(a.target, a.streams, a.pings, a.timeout))))
    elif a.cmd == "fanin":
        print(json.dumps(asyncio.run(_client_fanin(a.url, a.count, a.timeout))))
    elif a.cmd == "table":
        _table()


if __name__ == "__main__":
    main()
