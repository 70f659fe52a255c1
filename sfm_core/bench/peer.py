"""The child-process side of ``sfm bench``: receives, echoes or listens, and reports as JSON lines.

Run as ``python -m sfm_core.bench.peer ROLE ...``. It prints one JSON line when listening
(``url`` or ``address``). For ``*-recv`` and ``*-echo`` it then waits for a ``start`` line on
stdin, takes its CPU time and resets its peak RSS, answers ``{"armed": true}``, handles
``--count`` messages and prints ``t_end`` (``time.monotonic()`` when the last message's last
byte was in, a clock every process on the machine shares), ``cpu`` (its user+sys seconds
since ``start``) and ``peak_rss`` (bytes). It exits when its stdin closes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from typing import Any

#: The one clock of every timing point that spans two processes (CLOCK_MONOTONIC on Linux).
clock = time.monotonic


def emit(**data: object) -> None:
    """One JSON line on stdout."""
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def cpu_seconds() -> float:
    """User + system CPU seconds of this process, all its threads (``process_time``: a
    nanosecond clock; ``os.times`` counts in 10 ms ticks, too coarse for a short run)."""
    return time.process_time()


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux ``clear_refs``); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss() -> int:
    """This process's peak RSS in bytes (VmHWM on Linux, since the last reset; else getrusage)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def current_rss() -> int:
    """This process's resident set size in bytes. psutil is a test extra, not a dependency
    of ``sfm bench``: without it, Linux's /proc/self/statm, else the peak RSS (getrusage)."""
    try:
        import psutil
    except ImportError:
        pass
    else:
        return psutil.Process().memory_info().rss
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss()


def raise_nofile() -> int:
    """Raise the open-files limit as far as the machine allows; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def wait_stdin_closed() -> None:
    """Block until the parent closes our stdin."""
    sys.stdin.read()


def arm() -> float:
    """Wait for the parent's ``start``; reset the peak RSS; say so; the CPU seconds at that point."""
    line = sys.stdin.readline()
    if line.strip() != "start":
        raise SystemExit(f"bench peer: expected 'start', got {line!r}")
    reset_peak_rss()
    cpu = cpu_seconds()
    emit(armed=True)
    return cpu


def report(t_end: float, cpu0: float, **more: object) -> None:
    """The result line of a ``recv`` or ``echo`` run."""
    emit(t_end=t_end, cpu=cpu_seconds() - cpu0, peak_rss=peak_rss(), **more)


# -- a baseline: the adapter moves the bytes, this loop is the same for all ------------------


def baseline_server(mode: str, key: str, count: int) -> None:
    """Receive or echo ``count`` messages through the baseline ``key``'s adapter."""
    from .baselines import is_async, load

    baseline = load().by_key[key]
    if is_async(baseline):
        import asyncio

        asyncio.run(_async_baseline_server(mode, baseline, count))
        return
    listener = baseline.listen()
    emit(address=listener.address)
    cpu0 = arm()
    link = listener.accept(60.0)
    try:
        recv, send = link.recv, link.send
        if mode == "recv":
            for _ in range(count):
                recv()
            t_end = clock()
        else:
            for _ in range(count):
                send(recv())
            t_end = clock()
        report(t_end, cpu0)
        wait_stdin_closed()
    finally:
        link.close()
        listener.close()


async def _async_baseline_server(mode: str, baseline: Any, count: int) -> None:
    """:func:`baseline_server` for an asyncio adapter: the same loop, awaited."""
    import asyncio

    loop = asyncio.get_running_loop()
    listener = await baseline.listen()
    emit(address=listener.address)
    cpu0 = await loop.run_in_executor(None, arm)
    link = await listener.accept(60.0)
    try:
        recv, send = link.recv, link.send
        if mode == "recv":
            for _ in range(count):
                await recv()
            t_end = clock()
        else:
            for _ in range(count):
                await send(await recv())
            t_end = clock()
        report(t_end, cpu0)
        await loop.run_in_executor(None, wait_stdin_closed)
    finally:
        await link.close()
        await listener.close()


# -- sfm -------------------------------------------------------------------------------


def sfm_server(
    mode: str,
    url: str,
    count: int,
    tls_dir: str | None = None,
    identity_map: dict[str, str] | None = None,
    wrap_receiver: bool = False,
) -> None:
    """Receive, echo or listen as endpoint ``bench-server``; with ``tls_dir`` (a
    :mod:`sfm_core.pki` directory) the listener presents its server certificate, and
    ``identity_map`` (``ConnManager(identity_map=)``) lets many claimed names share one
    client certificate (fan-in). ``wrap_receiver`` registers the pass-through
    ``sfm_wrap_frame_receiver`` plugin of :mod:`.wrapper`; the result then says how many
    frames it saw (``wrapped_frames``)."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from sfm_core import ConnManager, Endpoint, MessageReceiver, Mode
    from sfm_core.pki import params_in

    from . import wrapper

    raise_nofile()
    if wrap_receiver:
        wrapper.register()
    manager = ConnManager(Endpoint("bench-server"), handshake_timeout=60.0, identity_map=identity_map)
    done = threading.Event()
    state = {"n": 0, "end": 0.0}

    class Counter(MessageReceiver):
        def process_message(self, endpoint, connection, app_id, message) -> None:
            n = state["n"] + 1
            state["n"] = n
            if n == count:
                state["end"] = clock()
                done.set()

    class Echo(MessageReceiver):
        def process_message(self, endpoint, connection, app_id, message) -> None:
            manager.send_message(endpoint, app_id, message.headers, message.payload)
            n = state["n"] + 1
            state["n"] = n
            if n == count:
                state["end"] = clock()
                done.set()

    manager.register_message_receiver(1, Counter() if mode == "recv" else Echo())
    params = params_in(tls_dir, server=True) if tls_dir else {}
    # Fan-in rows open up to 10,000 connections with 1,000 in their handshake at once: above
    # the defaults, which are sized for a listener on the open internet (docs/security.md).
    params.update(max_connections=20_000, max_handshakes=2_000)
    handle = manager.add_connector(url, params, Mode.PASSIVE)
    manager.start()
    emit(url=manager.wait_listening(handle, 30))
    try:
        if mode == "listen":
            # Fan-in: report on request ("stats" line), until stdin closes.
            for line in sys.stdin:
                if line.strip() == "stats":
                    ready = len(manager.endpoints)
                    emit(ready=ready, rss=current_rss(), threads=threading.active_count())
            return
        cpu0 = arm()
        done.wait()
        wrapped = {"wrapped_frames": wrapper.CountingReceiver.frames} if wrap_receiver else {}
        report(state["end"], cpu0, **wrapped)
        wait_stdin_closed()
    finally:
        manager.stop()


def main(argv: list[str] | None = None) -> None:
    """Parse the role and run it; exits without interpreter teardown."""
    ap = argparse.ArgumentParser(prog="python -m sfm_core.bench.peer")
    ap.add_argument("role", choices=["base-recv", "base-echo", "sfm-recv", "sfm-echo", "sfm-listen"])
    ap.add_argument("--url", default="tcp://127.0.0.1:0")
    ap.add_argument("--baseline", metavar="KEY", help="the baseline adapter (base-* roles), e.g. raw")
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--tls-dir", metavar="DIR", help="the sfm_core.pki directory (ca.pem, server.crt, server.key)")
    ap.add_argument(
        "--identity-map",
        metavar="PREFIX=IDENTITY",
        action="append",
        default=[],
        help="claimed names starting with PREFIX resolve to IDENTITY (identity binding); repeatable",
    )
    ap.add_argument(
        "--wrap-receiver",
        action="store_true",
        help="register a pass-through sfm_wrap_frame_receiver plugin that counts frames",
    )
    args = ap.parse_args(argv)
    identity_map = dict(item.split("=", 1) for item in args.identity_map) or None
    kind, mode = args.role.split("-")
    if kind == "base":
        baseline_server(mode, args.baseline, args.count)
    else:
        sfm_server(mode, args.url, args.count, args.tls_dir, identity_map, args.wrap_receiver)
    os._exit(0)  # skip interpreter teardown: the measurement is done


if __name__ == "__main__":
    main()
