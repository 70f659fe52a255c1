"""The harness of ``sfm bench``: every workload, timing point and measure, defined once.

A *subject* is what is measured: sfm over a scheme (:class:`SfmSubject`) or a bare library
through its :class:`~sfm_core.bench.baselines.Baseline` adapter (:class:`BaselineSubject`).
Each opens a :class:`Session`: a fresh child process (``python -m sfm_core.bench.peer``)
that receives or echoes, connected to this process. The workloads below drive every session
the same way:

* one-way (rates, throughput): the clock starts right before the first send, here, and stops
  in the child when the last message's last byte is in (``time.monotonic``, one clock for
  both processes); CPU time (user+sys, all threads) of each process over that window, and
  each process's peak RSS from the start of the window;
* round trip: each sample from right before a send to the echo's arrival, here; the first
  :data:`~sfm_core.bench.stats.WARMUP_SHARE` of samples dropped, p50/p99 by
  :func:`~sfm_core.bench.stats.percentile`.
"""

from __future__ import annotations

import logging
import select
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .peer import clock, cpu_seconds, peak_rss, reset_peak_rss

if TYPE_CHECKING:
    from sfm_core.pki import Pki

    from .baselines import Baseline, Link

log = logging.getLogger(__name__)


class PeerProcess:
    """A ``python -m sfm_core.bench.peer`` child speaking JSON lines."""

    def __init__(self, *args: str) -> None:
        import os

        # grpc core logs a GOAWAY line on stderr whenever a server stops with a stream open,
        # which every grpc run ends with (docs/drivers/grpc.md): only its errors, please.
        env = {**os.environ, "GRPC_VERBOSITY": os.environ.get("GRPC_VERBOSITY", "ERROR")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sfm_core.bench.peer", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def read(self, timeout: float = 300.0) -> dict:
        """The child's next JSON line."""
        import json

        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"bench peer {self.proc.args[3:]} said nothing for {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench peer {self.proc.args[3:]} exited with {self.proc.wait()}")
        return json.loads(line)

    def write(self, line: str) -> None:
        """One line to the child's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        """Close its stdin (it exits) and reap it."""
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


@dataclass
class Measurement:
    """What one run of a workload measured (times in seconds, sizes in bytes)."""

    count: int
    size: int
    #: One-way: first send to last byte at the receiver. Round trip: the whole run.
    elapsed: float
    cpu_sender: float
    cpu_receiver: float
    peak_rss_sender: int
    peak_rss_receiver: int
    #: Round trip only: every sample, warm-up included (the statistics drop it).
    samples: list[float] | None = None


class Session(Protocol):
    """One connection from this process to a fresh receiving or echoing child."""

    peer: PeerProcess

    def send_all(self, payload: bytes, count: int, senders: int, batch: int) -> float:
        """Send ``count`` messages (:func:`send_all`); the clock right before the first send."""

    def round_trips(self, payload: bytes, count: int) -> list[float]:
        """``count`` round trips one after the other; each sample from right before its send
        to the echo's arrival (:func:`link_round_trips` for a link)."""


def link_round_trips(link: Link, payload: bytes, count: int) -> list[float]:
    """Round trips over a baseline link: send, wait for the echo, next."""
    samples = []
    send, recv = link.send, link.recv
    for _ in range(count):
        t = clock()
        send(payload)
        recv()
        samples.append(clock() - t)
    return samples


async def async_link_round_trips(link: Any, payload: bytes, count: int) -> list[float]:
    """:func:`link_round_trips` over an :class:`~sfm_core.bench.baselines.AsyncLink`."""
    samples = []
    send, recv = link.send, link.recv
    for _ in range(count):
        t = clock()
        await send(payload)
        await recv()
        samples.append(clock() - t)
    return samples


class Subject(Protocol):
    """What is measured: opens sessions."""

    #: The row name.
    name: str

    def session(self, mode: str, count: int) -> Any:
        """A context manager giving a :class:`Session` to a child that will ``recv`` or
        ``echo`` ``count`` messages."""


def _arm(peer: PeerProcess) -> None:
    peer.write("start")
    if not peer.read().get("armed"):
        raise RuntimeError("bench peer did not arm")


def send_all(
    send: Callable[[bytes], None],
    payload: bytes,
    count: int,
    senders: int = 1,
    thread_safe: bool = False,
    send_batch: Callable[[list], None] | None = None,
    batch: int = 0,
) -> float:
    """Send ``count`` messages: one loop, ``senders`` threads in parallel (each its share; a
    lock around ``send`` unless ``thread_safe``), or lists of ``batch`` through ``send_batch``.
    Returns the clock right before the first send: the start of every one-way measurement."""
    if batch:
        assert send_batch is not None
        messages = [(None, payload)] * batch
        t0 = clock()
        for _ in range(count // batch):
            send_batch(messages)
        return t0
    if senders == 1:
        t0 = clock()
        for _ in range(count):
            send(payload)
        return t0
    if not thread_safe:
        lock = threading.Lock()
        unlocked = send

        def send(p: bytes) -> None:
            with lock:
                unlocked(p)

    go = threading.Event()

    def sender(n: int) -> None:
        go.wait()
        for _ in range(n):
            send(payload)

    shares = [count // senders + (i < count % senders) for i in range(senders)]
    threads = [threading.Thread(target=sender, args=(n,), name=f"bench-sender-{i}") for i, n in enumerate(shares)]
    for t in threads:
        t.start()
    t0 = clock()
    go.set()
    for t in threads:
        t.join()
    return t0


async def send_all_async(link: Any, payload: bytes, count: int, senders: int = 1) -> float:
    """:func:`send_all` over an :class:`~sfm_core.bench.baselines.AsyncLink`: ``senders``
    tasks on the loop stand for the threads (an asyncio lock around ``send``: one write at a
    time, as grpc.aio requires)."""
    send = link.send
    if senders == 1:
        t0 = clock()
        for _ in range(count):
            await send(payload)
        return t0
    import asyncio

    lock = asyncio.Lock()
    go = asyncio.Event()

    async def sender(n: int) -> None:
        await go.wait()
        for _ in range(n):
            async with lock:
                await send(payload)

    shares = [count // senders + (i < count % senders) for i in range(senders)]
    tasks = [asyncio.ensure_future(sender(n)) for n in shares]
    await asyncio.sleep(0)  # every task waiting on go
    t0 = clock()
    go.set()
    await asyncio.gather(*tasks)
    return t0


def oneway(subject: Subject, size: int, count: int, senders: int = 1, batch: int = 0) -> Measurement:
    """``count`` messages of ``size`` bytes to a receiving child, from ``senders`` threads
    (each its share, in parallel on one connection), or with ``batch`` > 0 through
    ``send_batch`` in lists of that many (``count`` is rounded down to a multiple)."""
    if batch:
        count -= count % batch
    payload = b"x" * size
    with subject.session("recv", count) as s:
        _arm(s.peer)
        reset_peak_rss()
        cpu0 = cpu_seconds()
        t0 = s.send_all(payload, count, senders, batch)
        result = s.peer.read()
        cpu = cpu_seconds() - cpu0
        rss = peak_rss()
    return Measurement(count, size, result["t_end"] - t0, cpu, result["cpu"], rss, result["peak_rss"])


def round_trip(subject: Subject, size: int, count: int) -> Measurement:
    """``count`` round trips of ``size`` bytes with an echoing child."""
    payload = b"x" * size
    with subject.session("echo", count) as s:
        _arm(s.peer)
        reset_peak_rss()
        cpu0 = cpu_seconds()
        t0 = clock()
        samples = s.round_trips(payload, count)
        result = s.peer.read()
        cpu = cpu_seconds() - cpu0
        rss = peak_rss()
    return Measurement(count, size, result["t_end"] - t0, cpu, result["cpu"], rss, result["peak_rss"], samples)


# -- a baseline through its adapter ------------------------------------------------------------


class _LinkSession:
    def __init__(self, peer: PeerProcess, link: Link) -> None:
        self.peer, self.link = peer, link

    def send_all(self, payload: bytes, count: int, senders: int, batch: int) -> float:
        if batch:
            raise ValueError("a baseline has no batch API")
        return send_all(self.link.send, payload, count, senders)  # an adapter: one sender at a time

    def round_trips(self, payload: bytes, count: int) -> list[float]:
        return link_round_trips(self.link, payload, count)


class _AsyncLinkSession:
    """A session over an asyncio adapter: its own event loop in this thread, for the session."""

    def __init__(self, peer: PeerProcess, loop: Any, link: Any) -> None:
        self.peer, self.loop, self.link = peer, loop, link

    def send_all(self, payload: bytes, count: int, senders: int, batch: int) -> float:
        if batch:
            raise ValueError("a baseline has no batch API")
        return self.loop.run_until_complete(send_all_async(self.link, payload, count, senders))

    def round_trips(self, payload: bytes, count: int) -> list[float]:
        return self.loop.run_until_complete(async_link_round_trips(self.link, payload, count))


def _close_loop(loop: Any) -> None:
    """Close a session's loop as ``asyncio.run`` would: the library's leftover tasks cancelled
    and awaited, its objects freed while the loop still runs (grpc.aio's poller calls back
    into the loop until its last call and channel are gone)."""
    import asyncio
    import gc

    try:
        gc.collect()
        loop.run_until_complete(asyncio.sleep(0.01))
        tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:  # gather() of nothing would make its future on another loop
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        gc.collect()
        loop.run_until_complete(asyncio.sleep(0.01))
    finally:
        loop.close()


class BaselineSubject:
    """A bare library through its adapter; ``key`` names it to the child (see ``baselines.load``)."""

    def __init__(self, key: str, baseline: Baseline) -> None:
        self.key, self.baseline = key, baseline
        self.name = baseline.name

    @contextmanager
    def session(self, mode: str, count: int) -> Iterator[_LinkSession | _AsyncLinkSession]:
        """A child listening through the adapter, and this side's link to it."""
        from .baselines import is_async

        with PeerProcess(f"base-{mode}", "--baseline", self.key, "--count", str(count)) as peer:
            address = peer.read()["address"]
            if not is_async(self.baseline):
                link = self.baseline.connect(address)
                try:
                    yield _LinkSession(peer, link)
                finally:
                    link.close()
                return
            import asyncio

            # A fresh loop for the session: this thread runs none (the drivers' loops have threads of their own).
            loop = asyncio.new_event_loop()
            try:
                alink = loop.run_until_complete(self.baseline.connect(address))
                try:
                    yield _AsyncLinkSession(peer, loop, alink)
                finally:
                    loop.run_until_complete(alink.close())
                    del alink
            finally:
                _close_loop(loop)


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
    import time

    from sfm_core import EndpointState

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ep = manager.find_endpoint(name)
        if ep is not None and ep.state == EndpointState.READY:
            return ep
        time.sleep(0.005)
    raise TimeoutError(f"{name} not READY after {timeout} s")


class _SfmSession:
    def __init__(self, peer: PeerProcess, manager: Any, server: Any) -> None:
        self.peer, self.manager, self.server = peer, manager, server

    def send_all(self, payload: bytes, count: int, senders: int, batch: int) -> float:
        from functools import partial

        send = partial(self.manager.send_message, self.server, 1, None)
        send_batch = partial(self.manager.send_messages, self.server, 1)
        # ConnManager.send_message is thread-safe: no lock around it.
        return send_all(send, payload, count, senders, thread_safe=True, send_batch=send_batch, batch=batch)

    def round_trips(self, payload: bytes, count: int) -> list[float]:
        """Ping-pong driven from the receiver callback, as a request/response app would be
        (no thread hop): same timing points as :func:`link_round_trips`."""
        from sfm_core import MessageReceiver

        samples: list[float] = []
        done = threading.Event()
        state = {"t0": 0.0}
        manager = self.manager

        class PingPong(MessageReceiver):
            def process_message(self, endpoint, connection, app_id, message) -> None:
                samples.append(clock() - state["t0"])
                if len(samples) >= count:
                    done.set()
                    return
                state["t0"] = clock()
                manager.send_message(endpoint, 1, None, payload)

        manager.register_message_receiver(1, PingPong())
        state["t0"] = clock()
        manager.send_message(self.server, 1, None, payload)
        if not done.wait(300):
            raise TimeoutError("ping-pong did not finish")
        return samples


class SfmSubject:
    """sfm over ``scheme`` (with ``pki``'s certificates: mutual TLS); with ``wrap_receiver`` the
    receiving child runs the pass-through ``sfm_wrap_frame_receiver`` plugin (:mod:`.wrapper`),
    which must have seen every message's frames."""

    def __init__(self, scheme: str, pki: Pki | None = None, wrap_receiver: bool = False, name: str = "") -> None:
        self.scheme, self.pki, self.wrap_receiver = scheme, pki, wrap_receiver
        self.name = name or scheme

    @contextmanager
    def session(self, mode: str, count: int) -> Iterator[_SfmSession]:
        """A child ConnManager (``bench-server``) and a ConnManager here connected to it."""
        more = ["--count", str(count), *(["--wrap-receiver"] if self.wrap_receiver else [])]
        with PeerProcess(*_peer_args(f"sfm-{mode}", self.scheme, self.pki, *more)) as peer:
            manager = _client(peer.read()["url"], pki=self.pki)
            manager.start()
            try:
                session = _SfmSession(peer, manager, _wait_ready(manager, "bench-server"))
                yield session
            finally:
                manager.stop()


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
    import time

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
