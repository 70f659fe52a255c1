"""The child-process side of ``sfm bench``: receives, echoes or listens, and reports as JSON lines.

Run as ``python -m sfm_core.bench.peer ROLE ...``; it prints one JSON line when ready (with the
URL or port to use) and one with its result. It exits when its stdin closes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import threading
import time

from . import raw


def emit(**data: object) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


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
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def raise_nofile() -> int:
    """Raise the open-files limit as far as the machine allows; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def wait_stdin_closed() -> None:
    sys.stdin.read()


# -- raw sockets -----------------------------------------------------------------------


def raw_server(mode: str, count: int) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    emit(port=srv.getsockname()[1])
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    srv.close()
    try:
        if mode == "recv":
            raw.recv_message(conn)
            start = time.perf_counter()
            for _ in range(count - 1):
                raw.recv_message(conn)
            elapsed = time.perf_counter() - start
            emit(count=count - 1, elapsed=elapsed)
        else:  # echo until the peer closes
            while True:
                try:
                    msg = raw.recv_message(conn)
                except ConnectionError:
                    break
                raw.send_message(conn, bytes(msg))
    finally:
        conn.close()
    wait_stdin_closed()


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
    state = {"n": 0, "start": 0.0, "end": 0.0}

    class Counter(MessageReceiver):
        def process_message(self, endpoint, connection, app_id, message) -> None:
            n = state["n"] + 1
            state["n"] = n
            if n == 1:
                state["start"] = time.perf_counter()
            elif n == count:
                state["end"] = time.perf_counter()
                done.set()

    class Echo(MessageReceiver):
        def process_message(self, endpoint, connection, app_id, message) -> None:
            manager.send_message(endpoint, app_id, message.headers, message.payload)

    manager.register_message_receiver(1, Counter() if mode == "recv" else Echo())
    params = params_in(tls_dir, server=True) if tls_dir else {}
    # Fan-in rows open up to 10,000 connections with 1,000 in their handshake at once: above
    # the defaults, which are sized for a listener on the open internet (docs/security.md).
    params.update(max_connections=20_000, max_handshakes=2_000)
    handle = manager.add_connector(url, params, Mode.PASSIVE)
    manager.start()
    emit(url=manager.wait_listening(handle, 30))
    try:
        if mode == "recv":
            done.wait()
            wrapped = {"wrapped_frames": wrapper.CountingReceiver.frames} if wrap_receiver else {}
            emit(count=count - 1, elapsed=state["end"] - state["start"], **wrapped)
            wait_stdin_closed()
        elif mode == "listen":
            # Fan-in: report on request ("stats" line), until stdin closes.
            for line in sys.stdin:
                if line.strip() == "stats":
                    ready = len(manager.endpoints)
                    emit(ready=ready, rss=current_rss(), threads=threading.active_count())
        else:
            wait_stdin_closed()
    finally:
        manager.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sfm_core.bench.peer")
    ap.add_argument("role", choices=["raw-recv", "raw-echo", "sfm-recv", "sfm-echo", "sfm-listen"])
    ap.add_argument("--url", default="tcp://127.0.0.1:0")
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
    if kind == "raw":
        raw_server(mode, args.count)
    else:
        sfm_server(mode, args.url, args.count, args.tls_dir, identity_map, args.wrap_receiver)
    os._exit(0)  # skip interpreter teardown: the measurement is done


if __name__ == "__main__":
    main()
