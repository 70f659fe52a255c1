"""The ``sfm`` command: list drivers, serve, ping, demo and benchmark."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

from .conn_manager import ConnManager
from .driver import Mode
from .endpoint import Endpoint, EndpointMonitor, EndpointState
from .errors import CommError
from .message import Message, MessageReceiver
from .registry import get_registry
from .tls import SECURE_SCHEMES as _SECURE

#: Schemes that need certificates (the demo makes a throwaway PKI for them).
SECURE_SCHEMES = set(_SECURE)
#: Command-line options for the TLS connector parameters (same names as NVFlare's).
TLS_OPTIONS = ("ca_cert", "server_cert", "server_key", "client_cert", "client_key", "connection_security")


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- sfm drivers -------------------------------------------------------------------------


def cmd_drivers(args: argparse.Namespace) -> int:
    entries = [e.describe() for e in get_registry().load_all()]
    if args.json:
        _out(json.dumps({"drivers": entries}, indent=2))
        return 0
    if not entries:
        _out("no drivers installed; pip install sfm-driver-tcp (or another sfm-driver-*)")
        return 0
    rows = [("scheme", "distribution", "version", "driver class", "capabilities", "status")]
    for e in entries:
        status = e["status"]
        if status == "failed":
            status = f"failed to load: {e['error']}"
        elif status == "shadowed":
            status = f"shadowed by {e['shadowed_by']}"
        caps = ", ".join(f"{k}={v}" for k, v in (e["capabilities"] or {}).items())
        rows.append((e["scheme"], e["distribution"], e["version"], e["driver_class"] or "-", caps, status))
    _out(_table(rows))
    return 0


# -- sfm serve ---------------------------------------------------------------------------


class _PrintMonitor(EndpointMonitor):
    def state_change(self, endpoint: Endpoint) -> None:
        props = {k: v for k, v in endpoint.properties.items() if k != "timestamp"}
        _out(f"endpoint {endpoint.name}: {endpoint.state.name} {props if props else ''}".rstrip())


class _Echo(MessageReceiver):
    def __init__(self, manager: ConnManager) -> None:
        self.manager = manager

    def process_message(self, endpoint: Endpoint, connection: Any, app_id: int, message: Message) -> None:
        try:
            self.manager.send_message(endpoint, app_id, message.headers, message.payload)
        except CommError as e:
            logging.getLogger("sfm.serve").warning("echo to %s failed: %s", endpoint.name, e)


def _tls_params(args: argparse.Namespace) -> dict:
    """The TLS connector params given as options (``--ca-cert`` ...)."""
    return {k: getattr(args, k) for k in TLS_OPTIONS if getattr(args, k, None)}


def _add_tls_options(p: argparse.ArgumentParser, *, server: bool) -> None:
    g = p.add_argument_group("TLS (stcp, grpcs, wss, https, or secure=true in the URL)")
    g.add_argument(
        "--ca-cert", dest="ca_cert", metavar="PEM", help="CA certificate that signed the peers' certificates"
    )
    if server:
        g.add_argument("--server-cert", dest="server_cert", metavar="PEM", help="this listener's certificate")
        g.add_argument("--server-key", dest="server_key", metavar="PEM", help="its private key")
    g.add_argument("--client-cert", dest="client_cert", metavar="PEM", help="this client's certificate (mtls)")
    g.add_argument("--client-key", dest="client_key", metavar="PEM", help="its private key")
    g.add_argument(
        "--connection-security",
        dest="connection_security",
        choices=("mtls", "tls", "clear"),
        help="mtls (default on secure schemes), tls (server certificate only), clear",
    )


def _wait_for_signal(manager: ConnManager) -> None:
    # The handlers only set flags: a handler runs on this thread between two bytecodes, and
    # one that took a lock (Event.set) could wait forever for a lock this thread holds.
    flags = {"stop": False, "reload": False}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: flags.__setitem__("stop", True))
    signal.signal(signal.SIGHUP, lambda *_: flags.__setitem__("reload", True))
    while not flags["stop"]:
        time.sleep(0.1)
        if flags["reload"]:
            flags["reload"] = False
            try:
                manager.reload_tls()
                print("sfm serve: TLS files reloaded; new connections use them", file=sys.stderr)
            except CommError as e:
                print(f"sfm serve: TLS reload failed, the old files stay in use: {e.message}", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    if args.config:
        from .config import load_config

        given = sorted(k for k in TLS_OPTIONS if getattr(args, k, None))
        if given:
            opts = ", ".join("--" + k.replace("_", "-") for k in given)
            print(f"sfm serve: {opts} with --config: put TLS files in the connector's params", file=sys.stderr)
            return 2
        manager, handles = load_config(args.config).build()
    else:
        if not args.url or not args.name:
            print("sfm serve: give URL and --name, or --config FILE", file=sys.stderr)
            return 2
        kw = {} if args.heartbeat is None else {"heartbeat_interval": args.heartbeat}
        manager = ConnManager(Endpoint(args.name), **kw)
        mode = Mode.ACTIVE if args.connect else Mode.PASSIVE
        handles = [manager.add_connector(args.url, _tls_params(args), mode)]
    name = manager.local_endpoint.name
    manager.add_endpoint_monitor(_PrintMonitor())
    if args.echo is not None:
        manager.register_message_receiver(args.echo, _Echo(manager))
    manager.start()
    try:
        for handle in handles:
            connector = manager.get_connector(handle)
            if connector.mode == Mode.PASSIVE:
                _out(f"{name} listening on {manager.wait_listening(handle, 10)}")
            else:
                _out(f"{name} connecting to {connector.params.get('url')}")
        _wait_for_signal(manager)
    finally:
        manager.stop()
    return 0


# -- sfm ping ----------------------------------------------------------------------------


class _Waiter(MessageReceiver):
    def __init__(self) -> None:
        self.event = threading.Event()

    def process_message(self, endpoint: Endpoint, connection: Any, app_id: int, message: Message) -> None:
        self.event.set()


class _ReadyMonitor(EndpointMonitor):
    def __init__(self) -> None:
        self.ready: list[Endpoint] = []
        self.event = threading.Event()

    def state_change(self, endpoint: Endpoint) -> None:
        if endpoint.state == EndpointState.READY:
            self.ready.append(endpoint)
            self.event.set()


def _round_trips(manager: ConnManager, peer: Endpoint, waiter: _Waiter, app_id: int, size: int, count: int) -> list:
    payload = b"p" * size
    rtts = []
    for _ in range(count):
        waiter.event.clear()
        t0 = time.perf_counter()
        manager.send_message(peer, app_id, None, payload)
        if not waiter.event.wait(10):
            raise CommError(CommError.TIMEOUT, f"no echo from {peer.name} within 10 s (is it serving --echo {app_id}?)")
        rtts.append(time.perf_counter() - t0)
    return rtts


def cmd_ping(args: argparse.Namespace) -> int:
    manager = ConnManager(Endpoint(args.name), reconnect_max=1.0)
    monitor = _ReadyMonitor()
    waiter = _Waiter()
    manager.add_endpoint_monitor(monitor)
    manager.register_message_receiver(args.app_id, waiter)
    try:
        manager.add_connector(args.url, _tls_params(args), Mode.ACTIVE)
    except CommError as e:
        print(f"sfm ping: {e.message}", file=sys.stderr)
        manager.stop()
        return 2
    t0 = time.perf_counter()
    manager.start()
    try:
        if not monitor.event.wait(args.timeout):
            connector = next(iter(manager.connectors.values()))
            why = f": {connector.error}" if connector.error else ""
            print(f"sfm ping: cannot reach {args.url} within {args.timeout} s{why}", file=sys.stderr)
            return 1
        handshake_ms = (time.perf_counter() - t0) * 1000
        peer = monitor.ready[0]
        props = {k: v for k, v in peer.properties.items() if k != "timestamp"}
        _out(f"connected to {peer.name} at {args.url} in {handshake_ms:.1f} ms")
        _out(f"  properties: {props}")
        _out(f"  connection: {peer.conn_props}")
        try:
            rtts = _round_trips(manager, peer, waiter, args.app_id, args.size, args.count)
        except CommError as e:
            print(f"sfm ping: {e.message}", file=sys.stderr)
            return 1
        us = sorted(r * 1e6 for r in rtts)
        _out(
            f"{len(us)} round trips of {args.size} B: min {us[0]:.0f} us, p50 {statistics.median(us):.0f} us, "
            f"p99 {us[min(len(us) - 1, int(len(us) * 0.99))]:.0f} us, max {us[-1]:.0f} us"
        )
        return 0
    finally:
        manager.stop()


# -- sfm demo ----------------------------------------------------------------------------


def _demo_pki(directory: str) -> tuple[dict, dict]:
    """Server and client TLS params with certificates made now (a throwaway CA), or raise
    ImportError when trustme, which makes them, is not installed."""
    from .pki import make_pki

    pki = make_pki(directory, "demo-server", "demo-client")
    return pki.server, pki.client


def _demo_scheme(scheme: str, tls: tuple[dict, dict] = ({}, {})) -> dict:
    from .bench.workloads import _wait_ready

    server = ConnManager(Endpoint("demo-server", {"role": "server"}))
    client = ConnManager(Endpoint("demo-client", {"role": "client"}))
    big = 8 * 1024 * 1024
    got: dict[str, list] = {"server": [], "client": []}
    events = {"server": threading.Event(), "client": threading.Event()}

    class Collect(MessageReceiver):
        def __init__(self, side: str, echo_to: ConnManager | None) -> None:
            self.side, self.echo_to = side, echo_to

        def process_message(self, endpoint: Endpoint, connection: Any, app_id: int, message: Message) -> None:
            size = 0 if message.payload is None else len(message.payload)
            got[self.side].append(size)
            if self.echo_to is not None and size < 1024:
                self.echo_to.send_message(endpoint, app_id, message.headers, message.payload)
            events[self.side].set()

    server.register_message_receiver(1, Collect("server", server))
    client.register_message_receiver(1, Collect("client", None))
    try:
        handle = server.add_connector(f"{scheme}://127.0.0.1:0", dict(tls[0]), Mode.PASSIVE)
        server.start()
        url = server.wait_listening(handle, 10)
        t0 = time.perf_counter()
        client.add_connector(url, dict(tls[1]), Mode.ACTIVE)
        client.start()
        peer = _wait_ready(client, "demo-server", 10)
        _wait_ready(server, "demo-client", 10)
        handshake_ms = (time.perf_counter() - t0) * 1000

        rtts = []
        for _ in range(200):
            events["client"].clear()
            t = time.perf_counter()
            client.send_message(peer, 1, {"seq": len(rtts)}, b"hello")
            events["client"].wait(5)
            rtts.append(time.perf_counter() - t)

        # 8 MiB both ways, 4 times each.
        payload = bytes(big)

        def push(sender: ConnManager, to: Endpoint, side: str) -> float:
            before = len(got[side])
            t = time.perf_counter()
            for _ in range(4):
                sender.send_message(to, 1, None, payload)
            while len(got[side]) < before + 4 and time.perf_counter() - t < 30:
                time.sleep(0.001)
            return 4 * big / (time.perf_counter() - t) / 1e6

        up = push(client, peer, "server")
        down = push(server, server.wait_for_endpoint("demo-client"), "client")
        ok = got["server"].count(big) == 4 and got["client"].count(big) == 4
        return {
            "scheme": scheme,
            "handshake_ms": handshake_ms,
            "rtt_p50_us": statistics.median(rtts) * 1e6,
            "up_mb_s": up,
            "down_mb_s": down,
            "messages": len(got["server"]) + len(got["client"]),
            "ok": ok,
        }
    finally:
        client.stop()
        server.stop()


def cmd_demo(args: argparse.Namespace) -> int:
    registry = get_registry()
    entries = registry.load_all()
    _out("Drivers discovered through entry points:")
    for e in entries:
        _out(f"  {e.scheme:<6} {e.distribution} {e.version}  {e.status}{': ' + e.error if e.error else ''}")
    schemes = [e.scheme for e in entries if e.status == "ok"]
    only = os.environ.get("SFM_DEMO_SCHEMES")
    if only:  # e.g. tests that want one transport
        schemes = [s for s in schemes if s in only.split(",")]
    if not schemes:
        _out("no usable driver installed")
        return 1
    _out("")
    rows = [("scheme", "handshake ms", "RTT p50 us", "8 MiB up MB/s", "8 MiB down MB/s", "messages", "result")]
    failed = 0
    pki_dir = tempfile.TemporaryDirectory(prefix="sfm-demo-pki-")
    try:
        pki = _demo_pki(pki_dir.name) if SECURE_SCHEMES & set(schemes) else None
    except ImportError:
        pki = None
        _out("secure schemes skipped: the demo makes its certificates with trustme (pip install trustme)")
        schemes = [s for s in schemes if s not in SECURE_SCHEMES]
    for i, scheme in enumerate(schemes, 1):
        _out(f"[{i}/{len(schemes)}] {scheme}: two endpoints on loopback, handshake, 200 pings, 8 MiB both ways ...")
        try:
            r = _demo_scheme(scheme, pki if pki and scheme in SECURE_SCHEMES else ({}, {}))
        except Exception as e:
            failed += 1
            rows.append((scheme, "-", "-", "-", "-", "-", f"FAILED: {type(e).__name__}: {e}"))
            continue
        failed += not r["ok"]
        rows.append(
            (
                scheme,
                f"{r['handshake_ms']:.1f}",
                f"{r['rtt_p50_us']:.0f}",
                f"{r['up_mb_s']:,.0f}",
                f"{r['down_mb_s']:,.0f}",
                str(r["messages"]),
                "ok" if r["ok"] else "INCOMPLETE",
            )
        )
    pki_dir.cleanup()
    _out("")
    _out(_table(rows))
    return 1 if failed else 0


# -- sfm bench ---------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import runner
    from .pki import available as pki_available

    registry = get_registry()
    unique = runner.pick_schemes(registry, args.schemes or [e.scheme for e in registry.load_all() if e.status == "ok"])
    secure = [s for s in unique if s in SECURE_SCHEMES]
    if secure and not pki_available():
        print(
            f"sfm bench: {', '.join(secure)} skipped: the bench makes its certificates with trustme "
            "(pip install trustme)",
            file=sys.stderr,
        )
        unique = [s for s in unique if s not in SECURE_SCHEMES]
    plan = runner.QUICK if args.quick else runner.FULL
    if args.repeat is not None:
        if args.repeat < 1:
            raise CommError(CommError.BAD_CONFIG, f"--repeat must be at least 1, not {args.repeat}")
        plan = dataclasses.replace(plan, repeat=args.repeat)
    results = runner.run(unique, plan, runner.stderr_progress)
    _out(runner.table(results))
    if args.json:
        runner.write_json(results, args.json)
        _out(f"results written to {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sfm", description="sfm: messages between named endpoints over pluggable drivers")
    ap.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("drivers", help="list installed drivers by scheme")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_drivers)

    p = sub.add_parser("serve", help="run an endpoint")
    p.add_argument("url", nargs="?", help="listen URL (e.g. tcp://0:8002), or with --connect the URL to connect to")
    p.add_argument("--name", help="local endpoint name")
    p.add_argument("--config", metavar="FILE", help="a TOML file with the endpoint and its connectors")
    p.add_argument("--connect", action="store_true", help="connect to URL instead of listening")
    p.add_argument("--echo", type=int, metavar="APP_ID", help="echo DATA on APP_ID back to its sender")
    p.add_argument("--heartbeat", type=float, help="heartbeat interval in seconds (default 30)")
    _add_tls_options(p, server=True)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ping", help="round trips against an endpoint serving --echo")
    p.add_argument("url")
    p.add_argument("--name", required=True, help="local endpoint name")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--size", type=int, default=100, help="payload bytes")
    p.add_argument("--app-id", type=int, default=1)
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the handshake")
    _add_tls_options(p, server=False)
    p.set_defaults(func=cmd_ping)

    p = sub.add_parser("demo", help="every installed driver on loopback: handshake, messages, a table")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="sfm over each driver against raw and bare-library baselines")
    p.add_argument("--schemes", nargs="+", help="schemes to measure (default: every installed one)")
    p.add_argument("--quick", action="store_true", help="smaller counts, one round")
    p.add_argument(
        "--repeat", type=int, metavar="N", help="interleaved rounds, each row the best of them (default 3, --quick 1)"
    )
    p.add_argument("--json", metavar="PATH", help="also write results as JSON")
    p.set_defaults(func=cmd_bench)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except CommError as e:
        print(f"sfm {args.command}: {e.message or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
