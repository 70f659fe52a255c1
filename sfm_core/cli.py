"""The ``sfm`` command: list drivers, serve, ping, demo and benchmark."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Sequence
from typing import Any

from . import __version__
from .conn_manager import ConnManager
from .driver import Mode
from .endpoint import Endpoint, EndpointMonitor, EndpointState
from .errors import CommError, HandshakeRefused
from .listen_url import free_listen_url
from .masking import mask_urls, masked_logging
from .message import Message, MessageReceiver
from .registry import get_registry
from .tls import SECURE_SCHEMES as _SECURE
from .url import bind_host, parse_url

#: Schemes that need certificates (the demo makes a throwaway PKI for them).
SECURE_SCHEMES = set(_SECURE)
#: Command-line options for the TLS connector parameters (same names as NVFlare's).
TLS_OPTIONS = ("ca_cert", "server_cert", "server_key", "client_cert", "client_key", "connection_security")


def _out(line: str = "") -> None:
    """A result: on stdout (URL passwords masked)."""
    sys.stdout.write(mask_urls(line) + "\n")
    sys.stdout.flush()


def _progress(line: str) -> None:
    """What the command is doing (not a result): on stderr (URL passwords masked)."""
    sys.stderr.write(mask_urls(line) + "\n")
    sys.stderr.flush()


def _json(value: Any) -> None:
    _out(json.dumps(value, indent=2, default=str))


def _width() -> int | None:
    """Columns to fit tables in: the terminal's (or ``COLUMNS``); None when stdout is not a
    terminal (a pipe or file gets whole lines, for grep)."""
    if os.environ.get("COLUMNS") or sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


class _Wrapper(textwrap.TextWrapper):
    # Also break after a dot or comma, so dotted class names wrap at their dots.
    wordsep_re = wordsep_simple_re = re.compile(r"(\s+|(?<=[.,])(?=[^\s.,]))")


def _table(rows: Sequence[Sequence[str]], width: int | None = None, wrap: Sequence[int] = ()) -> str:
    """Rows (the first is the header) as aligned columns. With ``width``, the columns in
    ``wrap`` (widest first) are narrowed until the table fits, their cells wrapped onto
    more lines."""
    ncols = len(rows[0])
    widths = [max(len(r[i]) for r in rows) for i in range(ncols)]
    if width is not None:
        floor = {i: max(8, len(rows[0][i])) for i in wrap}
        while sum(widths) + 2 * (ncols - 1) > width:
            narrowable = [i for i in wrap if widths[i] > floor[i]]
            if not narrowable:
                break  # as narrow as it sensibly gets: the terminal wraps the rest
            widths[max(narrowable, key=lambda i: widths[i])] -= 1
    lines = []
    for n, r in enumerate(rows):
        cells = [_Wrapper(w, break_on_hyphens=False).wrap(c) or [""] for c, w in zip(r, widths, strict=True)]
        for k in range(max(len(c) for c in cells)):
            parts = [(c[k] if k < len(c) else "").ljust(w) for c, w in zip(cells, widths, strict=True)]
            lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _bad_config(error: BaseException | None) -> bool:
    return isinstance(error, CommError) and error.code == CommError.BAD_CONFIG


def _check_url(url: str, mode: Mode) -> None:
    """What the drivers may leave to connect time, checked now: a URL needs a port (a
    listener may ask for ``:0``, any free port; a connector needs a real one)."""
    params = parse_url(url)
    scheme, host = params["scheme"], params.get("host") or "HOST"
    port = params.get("port")
    if port is None:
        hint = f"{scheme}://{host}:8002" + (
            f", or {scheme}://{host}:0 for any free port" if mode == Mode.PASSIVE else ""
        )
        raise CommError(CommError.BAD_CONFIG, f"no port in {url} (e.g. {hint})")
    if port == 0 and mode == Mode.ACTIVE:
        raise CommError(CommError.BAD_CONFIG, f"port 0 in {url}: give the port the peer listens on")


def _add_connector(manager: ConnManager, url: str, params: dict, mode: Mode) -> str:
    """``manager.add_connector`` with the URL checked first: ``CommError(BAD_CONFIG)`` at once."""
    handle = manager.add_connector(url, params, mode)  # an unknown scheme or a bad parameter
    _check_url(url, mode)
    return handle


def _listen_failure(connector: Any) -> str:
    """Why a listener could not listen, plainly: ``address already in use``."""
    text = connector.error.message if isinstance(connector.error, CommError) else str(connector.error)
    text = text or "unknown error"
    errno = re.search(r"\[Errno (\d+)\]", text)
    if errno:
        reason = os.strerror(int(errno.group(1)))
        return reason[:1].lower() + reason[1:]
    said = re.search(r"cannot listen on \S+: (.*)", text)
    return said.group(1) if said else text


class _SkipReportedListenerFailure(logging.Filter):
    """Drops the connectors' log record of a listener that never listened: the CLI reports
    that itself, once, with the URL instead of the connector's handle."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "listener %s failed: %s" and record.args:
            return getattr(record.args[0], "url", "") is not None
        return True


def _positive(kind: type, *, zero: bool = False, maximum: int | None = None) -> Any:
    """An argparse ``type``: ``kind`` above 0 (or at least 0 with ``zero``), at most ``maximum``."""
    what = {int: "an integer", float: "a number"}[kind]

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}") from None
        if value < 0 or (value == 0 and not zero) or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {'0 or more' if zero else 'more than 0'}, not {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, not {text}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its own messages
    return convert


APP_ID = _positive(int, zero=True, maximum=0xFFFF)  # 16 bits in the frame header


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default where there is one worth showing (not None, not a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if (
            action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
            or action.nargs == 0
        ):
            return action.help or ""
        return super()._get_help_string(action) or ""


# -- sfm drivers -------------------------------------------------------------------------


def cmd_drivers(args: argparse.Namespace) -> int:
    registry = get_registry()
    if args.why:
        _out("\n".join(registry.explain(args.why, load=True)))
        return 0
    strict_error = None
    try:
        loaded = registry.load_all()
    except CommError as e:  # strict mode: the table still shows what failed, then exit 1
        strict_error = e.message
        loaded = registry.entries()
    entries = [e.describe() for e in loaded]
    if args.json:
        _json({"drivers": entries, "strict_error": strict_error})
    elif not entries:
        _out("no drivers installed; pip install sfm-driver-tcp (or another sfm-driver-*)")
    else:
        rows = [("scheme", "distribution", "version", "driver class", "capabilities", "status")]
        for e in entries:
            status = e["status"]
            if status == "failed":
                status = f"failed to load: {e['error']}"
            elif status == "shadowed":
                status = f"shadowed by {e['shadowed_by']}"
            elif status in ("incompatible", "denied") and e["error"]:
                status = f"{status}: {e['error'].removeprefix('denied: ')}"
            status = "; ".join([status, *e["notes"]])
            caps = ", ".join(f"{k}={v}" for k, v in (e["capabilities"] or {}).items())
            rows.append((e["scheme"], e["distribution"], e["version"], e["driver_class"] or "-", caps, status))
        _out(_table(rows, _width(), wrap=(3, 4, 5)))
    if strict_error is not None:
        _progress(f"sfm drivers: {strict_error}")
        return 1
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


def _wait_for_signal(manager: ConnManager) -> int:
    """Run until SIGINT/SIGTERM (0), or until a connector finds its configuration bad (2)."""
    # The handlers only set flags: a handler runs on this thread between two bytecodes, and
    # one that took a lock (Event.set) could wait forever for a lock this thread holds.
    flags = {"stop": False, "reload": False}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: flags.__setitem__("stop", True))
    signal.signal(signal.SIGHUP, lambda *_: flags.__setitem__("reload", True))
    while not flags["stop"]:
        time.sleep(0.1)
        for connector in list(manager.connectors.values()):
            if connector.mode == Mode.ACTIVE and _bad_config(connector.error):
                _progress(f"sfm serve: {connector.error.message}")
                return 2
        if flags["reload"]:
            flags["reload"] = False
            try:
                manager.reload_tls()
                _progress("sfm serve: TLS files reloaded; new connections use them")
            except CommError as e:
                _progress(f"sfm serve: TLS reload failed, the old files stay in use: {e.message}")
    return 0


def _listening_line(name: str, connector: Any, url: str) -> str:
    """What a listener bound and the URL a peer uses (the last word: one for this machine)."""
    if bind_host(connector.params.get("host")) != "":
        return f"{name} listening on {url}"
    bound = parse_url(url)
    port, scheme = bound["port"], bound["scheme"]
    return (
        f"{name} listening on all interfaces (0.0.0.0:{port}); peers connect to "
        f"{scheme}://{socket.gethostname()}:{port} (or another address of this machine), here to {url}"
    )


def _serve_config(args: argparse.Namespace) -> tuple[ConnManager, list[str]]:
    """``sfm serve --config FILE [URL] [--name N] [--heartbeat S] [--connect] [TLS options]``:
    the file, then the SFM_* environment, then the command line (docs/configuration.md):
    ``--name`` and ``--heartbeat`` replace the endpoint's name and heartbeat_interval, a URL
    is one more connector after the file's (``--connect`` and the TLS options are its own).
    ``--connect`` or a TLS option without a URL is refused: there is no connector for it."""
    from .config import load_config

    tls = {k: os.path.abspath(v) if k in TLS_OPTIONS[:5] else v for k, v in _tls_params(args).items()}
    if not args.url and (tls or args.connect):
        opts = ", ".join("--" + k.replace("_", "-") for k in (["connect"] if args.connect else []) + sorted(tls))
        raise CommError(
            CommError.BAD_CONFIG,
            f"{opts} with --config but no URL: they apply to the URL's connector; for the file's connectors "
            "put them in the file ([connector.tls], docs/configuration.md)",
        )
    overrides = []
    if args.name:
        overrides.append((("endpoint", "name"), args.name, "--name"))
    if args.heartbeat is not None:
        overrides.append((("manager", "heartbeat_interval"), args.heartbeat, "--heartbeat"))
    extra = []
    if args.url:
        mode = Mode.ACTIVE if args.connect else Mode.PASSIVE
        extra.append({"url": args.url, "mode": mode.value, "tls": tls, "origin": "command line URL"})
    return load_config(args.config, overrides=overrides, connectors=extra).build()


def cmd_serve(args: argparse.Namespace) -> int:
    if args.config:
        manager, handles = _serve_config(args)
    else:
        if not args.url or not args.name:
            _progress("sfm serve: give URL and --name, or --config FILE")
            return 2
        kw = {} if args.heartbeat is None else {"heartbeat_interval": args.heartbeat}
        manager = ConnManager(Endpoint(args.name), **kw)
        mode = Mode.ACTIVE if args.connect else Mode.PASSIVE
        try:
            handles = [_add_connector(manager, args.url, _tls_params(args), mode)]
        except CommError:
            manager.stop()
            raise
    name = manager.local_endpoint.name
    manager.add_endpoint_monitor(_PrintMonitor())
    if args.echo is not None:
        manager.register_message_receiver(args.echo, _Echo(manager))
    quiet = _SkipReportedListenerFailure()
    logging.getLogger("sfm_core.connectors").addFilter(quiet)
    manager.start()
    try:
        for handle in handles:
            connector = manager.get_connector(handle)
            url = connector.params.get("url")
            if connector.mode == Mode.PASSIVE:
                try:
                    _out(_listening_line(name, connector, manager.wait_listening(handle, 10)))
                except CommError as e:
                    why = _listen_failure(connector) if connector.error is not None else e.message
                    _progress(f"sfm serve: cannot listen on {url}: {why}")
                    return 1
            else:
                _progress(f"{name} connecting to {url} (its state changes follow on stdout)")
        return _wait_for_signal(manager)
    finally:
        manager.stop()
        logging.getLogger("sfm_core.connectors").removeFilter(quiet)


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


def _round_trips(
    manager: ConnManager, peer: Endpoint, waiter: _Waiter, args: argparse.Namespace, deadline: float
) -> list:
    payload = b"p" * args.size
    rtts: list[float] = []
    for _ in range(args.count):
        waiter.event.clear()
        t0 = time.perf_counter()
        manager.send_message(peer, args.app_id, None, payload)
        if not waiter.event.wait(max(0.0, deadline - time.monotonic())):
            raise CommError(
                CommError.TIMEOUT,
                f"no echo from {peer.name} within --timeout {args.timeout} s ({len(rtts)} of {args.count} round "
                f"trips done; is it serving --echo {args.app_id}?)",
            )
        rtts.append(time.perf_counter() - t0)
    return rtts


def _wait_ready(monitor: _ReadyMonitor, connector: Any, deadline: float) -> bool:
    """Wait for the handshake until ``deadline``; ``CommError(BAD_CONFIG)`` at once if the
    connector finds its configuration bad (it would only retry the same mistake)."""
    while not monitor.event.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
        if _bad_config(connector.error) or isinstance(connector.error, HandshakeRefused):
            raise connector.error
        if time.monotonic() >= deadline:
            return False
    return True


def cmd_ping(args: argparse.Namespace) -> int:
    manager = ConnManager(Endpoint(args.name), reconnect_max=1.0)
    monitor = _ReadyMonitor()
    waiter = _Waiter()
    manager.add_endpoint_monitor(monitor)
    manager.register_message_receiver(args.app_id, waiter)
    try:
        handle = _add_connector(manager, args.url, _tls_params(args), Mode.ACTIVE)
        connector = manager.get_connector(handle)
        t0 = time.perf_counter()
        deadline = time.monotonic() + args.timeout  # --timeout bounds the handshake and every echo together
        _progress(f"connecting to {args.url} ...")
        manager.start()
        try:
            ready = _wait_ready(monitor, connector, deadline)
        except HandshakeRefused as e:
            _progress(f"sfm ping: {args.url}: {e.message}")
            return 1
        if not ready:
            why = f": {connector.error}" if connector.error else ""
            _progress(f"sfm ping: cannot reach {args.url} within {args.timeout} s{why}")
            return 1
        handshake_ms = (time.perf_counter() - t0) * 1000
        peer = monitor.ready[0]
        props = {k: v for k, v in peer.properties.items() if k != "timestamp"}
        if not args.json:
            _out(f"connected to {peer.name} at {args.url} in {handshake_ms:.1f} ms")
            _out(f"  properties: {props}")
            _out(f"  connection: {peer.conn_props}")
        _progress(f"{args.count} round trips of {args.size} B on app id {args.app_id} ...")
        try:
            rtts = _round_trips(manager, peer, waiter, args, deadline)
        except CommError as e:
            _progress(f"sfm ping: {e.message}")
            return 1
        us = sorted(r * 1e6 for r in rtts)
        stats = {
            "min_us": us[0],
            "p50_us": statistics.median(us),
            "p99_us": us[min(len(us) - 1, int(len(us) * 0.99))],
            "max_us": us[-1],
        }
        if args.json:
            _json(
                {
                    "peer": peer.name,
                    "url": args.url,
                    "handshake_ms": handshake_ms,
                    "properties": props,
                    "connection": dict(peer.conn_props or {}),
                    "round_trips": {"count": len(us), "size": args.size, **stats},
                }
            )
        else:
            _out(
                f"{len(us)} round trips of {args.size} B: min {stats['min_us']:.0f} us, p50 {stats['p50_us']:.0f} us, "
                f"p99 {stats['p99_us']:.0f} us, max {stats['max_us']:.0f} us"
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
    # A driver says how it listens on a free address (a path-based one: a socket file).
    tmpdir = tempfile.mkdtemp(prefix="sfm-demo-")
    try:
        listen = free_listen_url(get_registry().get_driver_class(scheme), scheme, tmpdir)
        handle = server.add_connector(listen, dict(tls[0]), Mode.PASSIVE)
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
        shutil.rmtree(tmpdir, ignore_errors=True)


DEMO_LEGEND = (
    "handshake ms: from connecting until both sides are READY; RTT p50 us: median of 200 round trips of "
    "5 B; up = client to server, down = server to client, 8 MiB messages four times each way, in MB/s; "
    "messages = messages both sides received (200 pings + 200 echoes + 4 + 4 = 408)."
)


def cmd_demo(args: argparse.Namespace) -> int:
    registry = get_registry()
    entries = registry.load_all()
    say = _progress if args.json else _out  # with --json, stdout has the JSON only
    say("Drivers discovered through entry points:")
    for e in entries:
        say(f"  {e.scheme:<6} {e.distribution} {e.version}  {e.status}{': ' + e.error if e.error else ''}")
    installed = [e.scheme for e in entries if e.status == "ok"]
    schemes = installed
    only = os.environ.get("SFM_DEMO_SCHEMES")
    if only:  # e.g. tests that want one transport
        wanted = [s.strip().lower() for s in only.split(",") if s.strip()]
        known = {e.scheme for e in entries}
        unknown = [s for s in wanted if s not in known]
        unusable = [s for s in wanted if s in known and s not in installed]
        if unknown or unusable:
            if unknown:
                _progress(f"sfm demo: unknown scheme in SFM_DEMO_SCHEMES: {', '.join(unknown)}")
            if unusable:
                _progress(f"sfm demo: not usable (its driver failed to load, see above): {', '.join(unusable)}")
            _progress(f"installed: {', '.join(installed) or 'none'}")
            return 2
        schemes = [s for s in installed if s in wanted]
    if not schemes:
        _progress("sfm demo: no usable driver installed; pip install sfm-driver-tcp (or another sfm-driver-*)")
        return 1
    say("")
    rows = [("scheme", "handshake ms", "RTT p50 us", "8 MiB up MB/s", "8 MiB down MB/s", "messages", "result")]
    results: list[dict] = []
    failed = 0
    pki_dir = tempfile.TemporaryDirectory(prefix="sfm-demo-pki-")
    try:
        pki = _demo_pki(pki_dir.name) if SECURE_SCHEMES & set(schemes) else None
    except ImportError:
        pki = None
        _progress("secure schemes skipped: the demo makes its certificates with trustme (pip install trustme)")
        schemes = [s for s in schemes if s not in SECURE_SCHEMES]
    for i, scheme in enumerate(schemes, 1):
        step = f"[{i}/{len(schemes)}] {scheme}"
        _progress(f"{step}: two endpoints on loopback, handshake, 200 pings, 8 MiB both ways ...")
        t0 = time.perf_counter()
        try:
            r = _demo_scheme(scheme, pki if pki and scheme in SECURE_SCHEMES else ({}, {}))
        except Exception as e:
            failed += 1
            _progress(f"{step}: FAILED after {time.perf_counter() - t0:.1f} s: {type(e).__name__}: {e}")
            results.append({"scheme": scheme, "ok": False, "error": f"{type(e).__name__}: {e}"})
            rows.append((scheme, "-", "-", "-", "-", "-", f"FAILED: {type(e).__name__}: {e}"))
            continue
        failed += not r["ok"]
        results.append(r)
        _progress(f"{step}: done in {time.perf_counter() - t0:.1f} s{'' if r['ok'] else ' (INCOMPLETE)'}")
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
    if args.json:
        _json({"drivers": [e.describe() for e in entries], "results": results})
    else:
        width = _width()
        _out("")
        _out(_table(rows, width, wrap=(6,)))
        _out("")
        _out("\n".join(textwrap.wrap(DEMO_LEGEND, width or 100)))
    return 1 if failed else 0


# -- sfm bench ---------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    # Before any driver imports grpc: its core logs a GOAWAY line (INFO) each time a grpc
    # run's server stops with a stream open, which is how every grpc row ends.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
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
    base = None
    if args.compare:
        try:  # read it before the run: a typo should not cost a whole run
            base = runner.read_json(args.compare)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CommError(CommError.BAD_CONFIG, f"--compare {args.compare}: not a bench JSON file: {e}") from e
    results = runner.run(unique, plan, runner.stderr_progress)
    _out(runner.table(results))
    if args.json:
        runner.write_json(results, args.json)
        _out(f"results written to {args.json}")
    if base is not None:
        _out()
        _out(f"against {args.compare}:")
        _out(runner.compare(results, base, args.compare))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="sfm",
        description="sfm: messages between named endpoints over pluggable drivers",
        formatter_class=_HelpFormatter,
    )
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    ap.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    sub = ap.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)
        # -v after the subcommand too; added to the -v before it (main).
        p.add_argument(
            "-v", "--verbose", dest="sub_verbose", action="count", default=0, help="log more (-v info, -vv debug)"
        )
        return p

    p = command("drivers", "list installed drivers by scheme")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--why", metavar="SCHEME", help="which distributions claim SCHEME, which one serves it and by which rule"
    )
    p.set_defaults(func=cmd_drivers)

    p = command("serve", "run an endpoint")
    p.add_argument("url", nargs="?", help="listen URL (e.g. tcp://0:8002), or with --connect the URL to connect to")
    p.add_argument("--name", help="local endpoint name")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="a TOML file with the endpoint and its connectors (docs/configuration.md); with it, --name and "
        "--heartbeat override the file's, a URL adds a connector",
    )
    p.add_argument("--connect", action="store_true", help="connect to URL instead of listening")
    p.add_argument("--echo", type=APP_ID, metavar="APP_ID", help="echo DATA on APP_ID back to its sender")
    p.add_argument("--heartbeat", type=_positive(float), metavar="S", help="heartbeat interval in seconds (default 30)")
    _add_tls_options(p, server=True)
    p.set_defaults(func=cmd_serve)

    p = command("ping", "round trips against an endpoint serving --echo")
    p.add_argument("url", help="the endpoint to connect to, e.g. tcp://server:8002 (sfm serve URL --echo 1 there)")
    p.add_argument("--name", required=True, help="local endpoint name")
    p.add_argument("--count", type=_positive(int), default=10, metavar="N", help="number of round trips")
    p.add_argument("--size", type=_positive(int, zero=True), default=100, metavar="BYTES", help="payload bytes")
    p.add_argument("--app-id", type=APP_ID, default=1, metavar="A", help="app id the server echoes (its --echo)")
    p.add_argument(
        "--timeout",
        type=_positive(float),
        default=5.0,
        metavar="S",
        help="seconds for the whole run: the handshake and every echo",
    )
    p.add_argument("--json", action="store_true", help="the results as JSON on stdout")
    _add_tls_options(p, server=False)
    p.set_defaults(func=cmd_ping)

    p = command("demo", "every installed driver on loopback: handshake, messages, a table")
    p.add_argument("--json", action="store_true", help="the results as JSON on stdout")
    p.set_defaults(func=cmd_demo)

    p = command("bench", "sfm over each driver against raw sockets and bare-library baselines")
    p.add_argument("--schemes", nargs="+", help="schemes to measure (default: every installed one)")
    p.add_argument("--quick", action="store_true", help="smaller counts, one round")
    p.add_argument(
        "--repeat",
        type=int,
        metavar="N",
        help="interleaved rounds, each row the best of them (default 3, --quick 1)",
    )
    p.add_argument("--json", metavar="PATH", help="also write results as JSON")
    p.add_argument(
        "--compare",
        metavar="BASE.json",
        help="after the run, each row against the same row of an earlier run's --json file",
    )
    p.set_defaults(func=cmd_bench)

    from .config_cli import add_command as add_config

    add_config(sub, _HelpFormatter)

    # Its module imports pytest only when the command runs: plain `sfm` use does not need it.
    from .testing.command import add_command as add_conformance

    add_conformance(sub)

    from .scaffold import add_command as add_new_driver

    add_new_driver(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = args.verbose + args.sub_verbose
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with masked_logging():  # passwords in URLs never reach the log
        try:
            return int(args.func(args) or 0)
        except CommError as e:
            _progress(f"sfm {args.command}: {e.message or e}")
            return 2
        except KeyboardInterrupt:
            return 130


if __name__ == "__main__":
    sys.exit(main())
