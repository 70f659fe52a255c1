"""The driver conformance suite: pytest tests over real connections of the driver under test.

Collected only when the plugin is on (:mod:`sfm_core.testing.plugin`); the scheme comes from
``--sfm-conformance`` or a conftest's ``sfm_conformance_scheme``. Every check runs the driver
through :class:`~sfm_core.ConnManager`, as an application would, or as a bare driver with a
monitor of its own where a peer must misbehave (a bad frame, a silent handshake). Every
failure names the rule it checks and where ``docs/`` states it. See ``docs/conformance.md``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest

from sfm_core import (
    CommError,
    ConnectorInfo,
    ConnManager,
    ConnState,
    Driver,
    Endpoint,
    EndpointState,
    Mode,
    get_registry,
    pki,
)
from sfm_core import frames as fr
from sfm_core.frames import PREFIX, FrameType, encode_frame
from sfm_core.handshake import build_handshake
from sfm_core.tls import SECURE_SCHEMES
from sfm_core.url import parse_url

from . import LISTEN_URL_CAPABILITY
from .helpers import (
    MIB,
    Collector,
    ConnLog,
    StateLog,
    open_fds,
    rss_bytes,
    scaled,
    socket_files,
    threads,
    wait_until,
)
from .plugin import conformance_scheme, conformance_tls_params

APP = 1  # the app_id of every DATA the suite sends (the child peer echoes it)
LARGE_LIMIT = 16 * MIB  # the largest payload tried, if the driver allows as much

# -- the rules, as docs/ states them -------------------------------------------------------------

R_RESOLVE = (
    "rule: a driver registers its Driver subclass under the entry-point group 'sfm.drivers', "
    "named by the URL scheme (docs/plugins.md, 'Writing a driver')"
)
R_CAPS = (
    "rule: supported_transports() lists the scheme and capabilities() is a dict whose "
    "'max_frame_size' is the largest frame the driver carries (docs/plugins.md, 'The contract')"
)
R_LISTEN = (
    "rule: listen() binds, then calls connector.listening(url) with the real URL peers can use "
    "(the actual port when 0 was asked; never 0 or an all-interfaces host that cannot be dialled) "
    "(docs/plugins.md, 'The contract': listen; docs/conformance.md, 'Listening on a free address')"
)
R_HANDSHAKE = (
    "rule: call add_connection(conn) once a connection is up and hand every received frame to "
    "conn.process_frames(); the active side's HELLO is then answered by READY and both endpoints "
    "become READY with the peer's properties (docs/plugins.md, 'The contract'; "
    "docs/wire-protocol.md, 'Handshake')"
)
R_PROPS = "rule: get_conn_properties() has at least 'peer_addr' and 'local_addr' (docs/plugins.md, 'The contract')"
R_DATA = (
    "rule: a frame arrives whole and unchanged: its headers (any MessagePack map) and payload; a "
    "payload of no bytes arrives as None, any other as a memoryview (docs/wire-protocol.md, 'DATA'; "
    "docs/architecture.md, 'Payload type')"
)
R_LARGE = (
    "rule: frames up to capabilities()['max_frame_size'] are carried whole; frames are delivered "
    "whole, never split or truncated (docs/plugins.md, 'The contract': capabilities, send_frame)"
)
R_ORDER = (
    "rule: the frames of one connection arrive in the order they were sent, each exactly once "
    "(docs/architecture.md, 'Delivery semantics')"
)
R_CONCURRENT = (
    "rule: frames arrive in the order send_frame accepted them, each once, whichever thread sent "
    "them (docs/architecture.md, 'Delivery semantics'; docs/plugins.md, 'The contract': send_frame)"
)
R_BACKPRESSURE = (
    "rule: send_frame blocks while the transport is full (with a timeout), and a slow receiver "
    "stops the reading (inline delivery, or pause_reading): the sender's memory stays bounded "
    "(docs/plugins.md, 'The contract': send_frame, and 'Receiving threads')"
)
R_RECONNECT = (
    "rule: connect() opens one connection and returns (or raises CommError) when it ends or "
    "cannot be made; the core then reconnects with backoff, so an active side comes back when "
    "its listener restarts on the URL it reported (docs/plugins.md, 'The contract': connect)"
)
R_CLOSE = (
    "rule: Connection.close() is idempotent and from any thread; when a connection ends, on "
    "either side, call remove_connection(conn), so the core and the peer's monitors see it "
    "closed (DISCONNECTED) (docs/plugins.md, 'The contract': Connection.close; "
    "docs/architecture.md, 'Delivery semantics')"
)
R_SEND_CLOSED = (
    "rule: send_frame on a closed connection raises CommError(CLOSED) (or TIMEOUT), never "
    "another exception and never silently (docs/plugins.md, 'The contract': send_frame)"
)
R_SEND_BLOCKED_CLOSED = (
    "rule: a send_frame blocked on a full transport raises CommError(CLOSED) (or TIMEOUT) soon "
    "after close() is called, from any thread: the connection's other senders wait for it "
    "(docs/plugins.md, 'The contract': send_frame)"
)
R_BAD_FRAME = (
    "rule: validate what you receive and close only the offending connection; every other "
    "connection goes on (docs/plugins.md, 'Validate what you receive'; docs/architecture.md, 'Errors')"
)
R_HANDSHAKE_TIMEOUT = (
    "rule: a connection whose handshake is not done within handshake_timeout is closed, on both "
    "sides: the driver must report the core's close to the peer (docs/architecture.md, 'Liveness'; "
    "docs/wire-protocol.md, 'Handshake')"
)
R_FANIN = (
    "rule: a listener accepts many connections at once, each its own connection with its own "
    "add_connection() (docs/plugins.md, 'The contract': listen)"
)
R_STOP = (
    "rule: shutdown() stops listening and connecting and closes every connection; after "
    "ConnManager.stop() no thread, descriptor or socket file of the driver is left "
    "(docs/plugins.md, 'The contract': shutdown; docs/architecture.md, 'Threads a ConnManager starts')"
)
R_REUSE = (
    "rule: once send_frame returns the caller may reuse its buffers: a driver may keep bytes to "
    "send later, but never a writable buffer (copy it, or send it before returning) "
    "(docs/plugins.md, 'The contract': send_frame; sfm_core/driver.py, Connection.send_frame)"
)

#: Header values of every MessagePack type (nil, bool, int of every width, float, str, bin,
#: array, map, ext and timestamp), as msgpack's defaults decode them.
ALL_TYPES_HEADERS: dict[str, Any] = {
    "nil": None,
    "true": True,
    "false": False,
    "fixint": 7,
    "negfixint": -5,
    "u8": 200,
    "u16": 60_000,
    "u32": 4_000_000_000,
    "u64": 2**64 - 1,
    "i8": -100,
    "i16": -30_000,
    "i32": -2_000_000_000,
    "i64": -(2**63),
    "float": 1.5,
    "str": "žluťoučký kůň 🐎",
    "empty_str": "",
    "bin": b"\x00\xff\x80",
    "empty_bin": b"",
    "array": [1, "a", b"z", None, [2, 3.25]],
    "empty_array": [],
    "map": {"k": {"nested": [1, 2]}, "n": -1},
    "ext": msgpack.ExtType(5, b"ext-data"),
    "timestamp": msgpack.Timestamp(1_700_000_000, 123_000_000),
    "long_str": "x" * 7000,
}


# -- fixtures ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tls:
    """The TLS params of each side (empty dicts on a plain scheme), and the endpoint names
    their certificates are for (identity binding, docs/security.md)."""

    server: dict[str, Any] = field(default_factory=dict)
    client: dict[str, Any] = field(default_factory=dict)
    server_name: str = "server"
    client_name: str = "site-1"


@pytest.fixture(scope="session")
def driver_scheme(pytestconfig: pytest.Config) -> str:
    """The scheme under test (``--sfm-conformance`` or the conftest's ``sfm_conformance_scheme``)."""
    scheme = conformance_scheme(pytestconfig)
    if not scheme:
        pytest.skip("the sfm conformance suite is off (give --sfm-conformance=SCHEME)")
    return str(scheme).lower()


@pytest.fixture(scope="session")
def driver_class(driver_scheme: str) -> type[Driver]:
    """The class of the installed driver for the scheme."""
    try:
        driver = get_registry().create_driver(driver_scheme)
    except CommError as e:
        pytest.fail(f"no usable driver for scheme {driver_scheme!r}: {e}; {R_RESOLVE}", pytrace=False)
    return type(driver)


@pytest.fixture(scope="session")
def capabilities(driver_class: type[Driver], driver_scheme: str) -> dict[str, Any]:
    caps = driver_class.capabilities()
    assert isinstance(caps, dict), f"capabilities() returned {type(caps).__name__}, not a dict; {R_CAPS}"
    return caps


@pytest.fixture(scope="session")
def max_payload(capabilities: dict[str, Any]) -> int:
    """The largest payload the suite sends: min(max_frame_size, 16 MiB), less room for the headers."""
    limit = capabilities.get("max_frame_size") or fr.MAX_FRAME_SIZE
    return min(int(limit), LARGE_LIMIT) - 1024


def _load_tls_file(path: str) -> Tls:
    with open(path, "rb") as f:
        data = tomllib.load(f) if path.endswith(".toml") else json.load(f)
    base = os.path.dirname(os.path.abspath(path))

    def side(name: str) -> dict:
        params = dict(data.get(name) or {})
        for key, value in params.items():
            if key.endswith(("_cert", "_key")) and isinstance(value, str) and not os.path.isabs(value):
                params[key] = os.path.join(base, value)
        return params

    if "server" not in data or "client" not in data:
        raise pytest.UsageError(
            f"{path}: a TLS params file needs a 'server' and a 'client' table (docs/conformance.md)"
        )
    return Tls(
        side("server"),
        side("client"),
        str(data.get("server_name") or "server"),
        str(data.get("client_name") or "site-1"),
    )


@pytest.fixture(scope="session")
def tls_params(
    pytestconfig: pytest.Config, driver_scheme: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Tls]:
    """The TLS params of each side: from ``--sfm-tls-params FILE``, else made with ``trustme``
    for a secure scheme, else none (a plain scheme)."""
    path = conformance_tls_params(pytestconfig)
    if path:
        yield _load_tls_file(str(path))
        return
    if driver_scheme not in SECURE_SCHEMES:
        yield Tls()
        return
    if not pki.available():
        pytest.skip(
            f"{driver_scheme}:// is a secure scheme: give --sfm-tls-params FILE (docs/conformance.md) "
            "or install trustme"
        )
    directory = tmp_path_factory.mktemp("sfm-conformance-pki")
    made = pki.make_pki(str(directory), "server", "site-1")
    yield Tls(made.server, made.client, "server", "site-1")


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A fresh directory with a short path (a Unix socket path is limited to ~107 bytes)."""
    directory = tempfile.mkdtemp(prefix="sfmc-")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def make_listen_url(scheme: str, capabilities: dict[str, Any], directory: str) -> str:
    """The URL to listen on a free address: the driver's ``capabilities()["listen_url"]`` (with
    ``{scheme}`` and ``{tmpdir}`` filled in), else ``SCHEME://127.0.0.1:0``."""
    template = capabilities.get(LISTEN_URL_CAPABILITY)
    if not template:
        return f"{scheme}://127.0.0.1:0"
    return str(template).format(scheme=scheme, tmpdir=directory)


@pytest.fixture
def listen_url(driver_scheme: str, capabilities: dict[str, Any], short_tmp: str) -> str:
    return make_listen_url(driver_scheme, capabilities, short_tmp)


class Child:
    """A listener in another process (:mod:`sfm_core.testing.peer`) that echoes app_id 1."""

    def __init__(self, url: str, name: str, params: dict, manager_kw: dict) -> None:
        self.stderr = tempfile.TemporaryFile()
        env = dict(os.environ)
        # The same modules as this process, wherever pytest put them on sys.path.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sfm_core.testing.peer",
                "--url",
                url,
                "--name",
                name,
                "--params",
                json.dumps(params),
                "--manager",
                json.dumps(manager_kw),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=env,
            text=True,
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], scaled(30))
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("LISTENING "):
            errors = self.errors()
            self.kill()
            raise AssertionError(
                f"a listener in another process (python -m sfm_core.testing.peer --url {url}) did not "
                f"report a URL: stdout {line!r}, stderr:\n{errors}\n{R_LISTEN}"
            )
        self.url = line.split(" ", 1)[1].strip()

    def errors(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-4000:]

    def stop(self) -> None:
        """Graceful: close its stdin, it stops its ConnManager and exits."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(scaled(15))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_pipes()

    def kill(self) -> None:
        """A crash: SIGKILL."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                pipe.close()
        self.stderr.close()


@dataclass
class Pair:
    server: ConnManager
    client: ConnManager
    url: str
    to_server: Endpoint
    to_client: Endpoint
    server_rx: Collector
    client_rx: Collector


class Net:
    """Makes ConnManagers, listeners, pairs, bare drivers and child listeners; tears them all
    down at the end of the test."""

    def __init__(self, scheme: str, caps: dict, tls: Tls, directory: str, max_frame: int) -> None:
        self.scheme = scheme
        self.caps = caps
        self.tls = tls
        self.directory = directory
        self.max_frame = max_frame
        self.managers: list[ConnManager] = []
        self.children: list[Child] = []
        self.bare: list[tuple[Driver, threading.Thread]] = []
        self._dirs = 0

    def listen_url(self) -> str:
        self._dirs += 1
        sub = os.path.join(self.directory, str(self._dirs))
        os.makedirs(sub, exist_ok=True)
        return make_listen_url(self.scheme, self.caps, sub)

    def manager(self, name: str, **kw: Any) -> ConnManager:
        kw.setdefault("reconnect_min", 0.05)
        kw.setdefault("reconnect_max", 0.5)
        kw.setdefault("linger", 2.0)
        kw.setdefault("max_frame_size", self.max_frame)
        m = ConnManager(Endpoint(name, {"role": name, "suite": "sfm-conformance"}), **kw)
        self.managers.append(m)
        return m

    def listen(self, manager: ConnManager, url: str | None = None) -> str:
        url = url or self.listen_url()
        handle = manager.add_connector(url, dict(self.tls.server), Mode.PASSIVE)
        manager.start()
        try:
            reported = manager.wait_listening(handle, scaled(10))
        except CommError as e:
            raise AssertionError(f"listening on {url} failed: {e}; {R_LISTEN}") from None
        check_reported_url(url, reported, self.scheme)
        return reported

    def connect(self, manager: ConnManager, url: str) -> str:
        handle = manager.add_connector(url, dict(self.tls.client), Mode.ACTIVE)
        manager.start()
        return handle

    def pair(self, server_kw: dict | None = None, client_kw: dict | None = None) -> Pair:
        server = self.manager(self.tls.server_name, **(server_kw or {}))
        client = self.manager(self.tls.client_name, **(client_kw or {}))
        server_rx, client_rx = Collector(), Collector()
        server.register_message_receiver(APP, server_rx)
        client.register_message_receiver(APP, client_rx)
        url = self.listen(server)
        self.connect(client, url)
        to_server = ready(
            client, self.tls.server_name, f"the active side, connecting to the reported {url}", rule=R_REPORTED
        )
        to_client = ready(server, self.tls.client_name, f"the passive side, listening on {url}")
        return Pair(server, client, url, to_server, to_client, server_rx, client_rx)

    def child(self, url: str | None = None, **manager_kw: Any) -> Child:
        manager_kw.setdefault("max_frame_size", self.max_frame)
        child = Child(url or self.listen_url(), self.tls.server_name, dict(self.tls.server), manager_kw)
        self.children.append(child)
        check_reported_url(url or "", child.url, self.scheme)
        return child

    def bare_driver(self, url: str, mode: Mode) -> tuple[Driver, ConnLog, ConnectorInfo, list]:
        """A driver instance of the scheme with a monitor of its own (no ConnManager): the
        suite plays a misbehaving peer through it. ``connect``/``listen`` run in a thread."""
        driver = get_registry().create_driver(self.scheme)
        log = ConnLog()
        driver.register_conn_monitor(log)
        params = {**parse_url(url), **(self.tls.client if mode == Mode.ACTIVE else self.tls.server)}
        params.setdefault("max_frame_size", self.max_frame)
        connector = ConnectorInfo(f"CH-conformance-{len(self.bare)}", driver, params, mode)
        errors: list = []

        def run() -> None:
            try:
                if mode == Mode.ACTIVE:
                    driver.connect(connector)
                else:
                    driver.listen(connector)
            except Exception as e:  # a connect that ends with CommError is normal
                errors.append(e)

        thread = threading.Thread(target=run, name=f"sfm-conformance-bare-{mode.value}", daemon=True)
        thread.start()
        self.bare.append((driver, thread))
        return driver, log, connector, errors

    def close(self) -> None:
        for driver, thread in self.bare:
            with contextlib.suppress(Exception):
                driver.shutdown()
            thread.join(scaled(10))
        for m in reversed(self.managers):
            m.stop(linger=0.5)
        for child in self.children:
            child.kill()


@pytest.fixture
def net(
    driver_scheme: str, capabilities: dict, tls_params: Tls, short_tmp: str, driver_class: type[Driver]
) -> Iterator[Net]:
    limit = int(capabilities.get("max_frame_size") or fr.MAX_FRAME_SIZE)
    n = Net(driver_scheme, capabilities, tls_params, short_tmp, min(limit, fr.MAX_FRAME_SIZE))
    try:
        yield n
    finally:
        n.close()


# -- shared assertions ------------------------------------------------------------------------


def check_reported_url(asked: str, reported: Any, scheme: str) -> None:
    assert isinstance(reported, str) and "://" in reported, f"the listener reported {reported!r}; {R_LISTEN}"
    params = parse_url(reported)
    assert params["scheme"] == scheme or scheme in SECURE_SCHEMES.values(), (
        f"listening on {asked} reported {reported!r}, a URL of another scheme than {scheme}://; {R_LISTEN}"
    )
    if "port" in params:
        assert params["port"] != 0, (
            f"listening on {asked} reported {reported!r}: port 0 is not the real port; {R_LISTEN}"
        )
    host = params.get("host")
    assert host not in ("0", "", "::", "0.0.0.0"), (
        f"listening on {asked} reported {reported!r}: an all-interfaces host is not an address peers can "
        f"dial (report the loopback or a real address); {R_LISTEN}"
    )


def ready(manager: ConnManager, name: str, what: str, timeout: float = 10.0, rule: str = R_HANDSHAKE) -> Endpoint:
    try:
        return manager.wait_for_endpoint(name, scaled(timeout))
    except CommError:
        raise AssertionError(
            f"{manager.local_endpoint.name} never saw {name!r} READY within {scaled(timeout):g} s ({what}); {rule}"
        ) from None


#: When the active side never gets READY over a URL a listener reported, either may be wrong.
R_REPORTED = f"the listener may report a URL that does not reach it: {R_LISTEN}; or {R_HANDSHAKE}"


def gone(manager: ConnManager, name: str, what: str, rule: str, timeout: float = 10.0) -> None:
    wait_until(lambda: manager.find_endpoint(name) is None, timeout, f"{name!r} to be gone at {what}", rule)


def numbered(msgs: list) -> list[int]:
    return [int.from_bytes(m[2][:4], "big") for m in msgs]


# -- the checks -------------------------------------------------------------------------------


def test_driver_declares_its_scheme_and_capabilities(driver_class: type[Driver], driver_scheme: str, capabilities):
    schemes = [s.lower() for s in driver_class.supported_transports()]
    assert driver_scheme in schemes, f"{driver_class.__name__}.supported_transports() is {schemes}; {R_CAPS}"
    limit = capabilities.get("max_frame_size")
    assert isinstance(limit, int) and limit >= 64 * 1024, (
        f"capabilities()['max_frame_size'] is {limit!r}: it must be an int, at least 64 KiB; {R_CAPS}"
    )
    template = capabilities.get(LISTEN_URL_CAPABILITY)
    if template is not None:
        url = make_listen_url(driver_scheme, capabilities, "/tmp/x")
        assert parse_url(url)["scheme"] == driver_scheme, (
            f"capabilities()['listen_url'] {template!r} gives {url!r}, not a {driver_scheme}:// URL; {R_LISTEN}"
        )


def test_handshake_both_ways_exchanges_names_properties_and_addresses(net: Net):
    p = net.pair()
    assert p.to_server.properties.get("role") == net.tls.server_name, f"{p.to_server.properties}; {R_HANDSHAKE}"
    assert p.to_client.properties.get("role") == net.tls.client_name, f"{p.to_client.properties}; {R_HANDSHAKE}"
    for side, ep in (("active", p.to_server), ("passive", p.to_client)):
        missing = [k for k in ("peer_addr", "local_addr") if k not in ep.conn_props]
        assert not missing, f"the {side} side's get_conn_properties() lacks {missing}: {ep.conn_props}; {R_PROPS}"
    p.client.send_message(p.to_server, APP, {"from": "client"}, b"to the listener")
    p.server.send_message(p.to_client, APP, {"from": "server"}, b"to the connector")
    assert p.server_rx.wait_for(1, rule=R_HANDSHAKE)[0][1:3] == ({"from": "client"}, b"to the listener"), R_DATA
    assert p.client_rx.wait_for(1, rule=R_HANDSHAKE)[0][1:3] == ({"from": "server"}, b"to the connector"), R_DATA


@pytest.mark.parametrize("where", ["listen_url", "all_interfaces"])
def test_listener_in_another_process_reports_a_url_that_works(net: Net, where: str):
    """Listen on port 0 (or the driver's free address) in a child process; connect here to the
    URL it reports: what a listener reporting a URL that does not work fails."""
    if where == "all_interfaces":
        if net.caps.get(LISTEN_URL_CAPABILITY):
            pytest.skip("the driver listens on its own kind of address (capabilities()['listen_url'])")
        url = f"{net.scheme}://0:0"
    else:
        url = net.listen_url()
    child = net.child(url)
    client = net.manager(net.tls.client_name)
    got = Collector()
    client.register_message_receiver(APP, got)
    net.connect(client, child.url)
    ep = ready(
        client,
        net.tls.server_name,
        f"connecting to {child.url}, reported by a listener on {url} in another process",
        rule=R_REPORTED,
    )
    client.send_message(ep, APP, {"n": 1}, b"echo me")
    assert got.wait_for(1, rule=R_DATA)[0][1:3] == ({"n": 1}, b"echo me"), f"the echo differs; {R_DATA}"


def _payload_cases(big: int) -> list[tuple[str, Any, bytes | None]]:
    return [
        ("bytes", b"bytes", b"bytes"),
        ("bytearray", bytearray(b"bytearray"), b"bytearray"),
        ("memoryview", memoryview(b"..view..")[2:6], b"view"),
        ("list of buffers", [b"li", bytearray(b"st"), memoryview(b"!")], b"list!"),
        ("one byte", b"\x00", b"\x00"),
        ("empty", b"", None),
        ("None", None, None),
        ("64 KiB + 1", bytes(range(256)) * 256 + b"\x01", bytes(range(256)) * 256 + b"\x01"),
        ("large", big, None),  # filled in below
    ]


def _big(n: int) -> bytes:
    block = bytes(range(251))  # a prime length: no buffer size is a multiple of it
    return (block * (n // len(block) + 1))[:n]


def _check_payloads(sender: ConnManager, to: Endpoint, rx: Collector, max_payload: int, what: str) -> None:
    big = _big(max_payload)
    cases = _payload_cases(max_payload)
    for i, (name, payload, _) in enumerate(cases):
        if name == "large":
            payload = big
        sender.send_message(to, APP, {**ALL_TYPES_HEADERS, "i": i, "case": name}, payload)
    msgs = rx.wait_for(len(cases), timeout=30, rule=R_DATA)
    assert len(msgs) == len(cases), f"{len(msgs)} messages arrived for {len(cases)} sent ({what}); {R_ORDER}"
    for i, (name, _payload, expected) in enumerate(cases):
        _, headers, payload, ptype = msgs[i]
        if name == "large":
            expected = big
        sent = {**ALL_TYPES_HEADERS, "i": i, "case": name}
        if headers != sent:
            changed = sorted(k for k in set(sent) | set(headers or {}) if (headers or {}).get(k) != sent.get(k))
            raise AssertionError(f"{what}: the headers of message {i} ({name}) arrived changed at {changed}; {R_DATA}")
        if expected is None:
            assert payload is None, f"{what}: a {name} payload arrived as {ptype.__name__}, not None; {R_DATA}"
        else:
            assert payload is not None and ptype is memoryview, (
                f"{what}: a {name} payload arrived as {ptype.__name__}; {R_DATA}"
            )
            if payload != expected:
                where = next((k for k in range(min(len(payload), len(expected))) if payload[k] != expected[k]), None)
                raise AssertionError(
                    f"{what}: the {name} payload ({len(expected)} bytes) arrived as {len(payload)} bytes, "
                    f"first difference at byte {where}; {R_LARGE if name == 'large' else R_DATA}"
                )


def test_data_of_every_header_type_and_payload_kind_both_ways(net: Net, max_payload: int):
    p = net.pair()
    _check_payloads(p.client, p.to_server, p.server_rx, max_payload, "active to passive")
    _check_payloads(p.server, p.to_client, p.client_rx, max_payload, "passive to active")


def test_data_through_a_listener_in_another_process(net: Net, max_payload: int):
    """The same DATA, to a listener in another process that sends each message back."""
    child = net.child()
    client = net.manager(net.tls.client_name)
    got = Collector()
    client.register_message_receiver(APP, got)
    net.connect(client, child.url)
    ep = ready(client, net.tls.server_name, f"connecting to {child.url} (a listener in another process)")
    _check_payloads(client, ep, got, max_payload, "to a listener in another process and back")


def test_thousands_of_messages_both_ways_arrive_once_and_in_order(net: Net):
    p = net.pair()
    n = 2000

    def send(manager: ConnManager, to: Endpoint) -> None:
        for i in range(n):
            manager.send_message(to, APP, None, i.to_bytes(4, "big"))

    back = threading.Thread(target=send, args=(p.server, p.to_client))
    back.start()
    send(p.client, p.to_server)
    back.join()
    for what, rx in (("active to passive", p.server_rx), ("passive to active", p.client_rx)):
        got = numbered(rx.wait_for(n, timeout=30, rule=R_ORDER))
        assert got == list(range(n)), _order_report(got, n, what)
    time.sleep(0.2)
    assert len(p.server_rx.messages) == n and len(p.client_rx.messages) == n, f"messages arrived twice; {R_ORDER}"


def _order_report(got: list[int], n: int, what: str) -> str:
    missing = sorted(set(range(n)) - set(got))
    dup = len(got) - len(set(got))
    first = next((k for k, v in enumerate(got) if v != k), None)
    return (
        f"{what}: {len(got)} of {n} messages; missing {missing[:10]}{'...' if len(missing) > 10 else ''}; "
        f"{dup} duplicated; first out of place at index {first}; {R_ORDER}"
    )


def test_concurrent_senders_each_keep_their_order(net: Net):
    p = net.pair()
    senders, per = 4, 500
    errors: list = []

    def send(tag: int) -> None:
        try:
            for i in range(per):
                p.client.send_message(p.to_server, APP, {"t": tag}, i.to_bytes(4, "big"))
        except Exception as e:
            errors.append(e)

    workers = [threading.Thread(target=send, args=(t,)) for t in range(senders)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not errors, f"a concurrent send_message raised {errors[0]!r}; {R_CONCURRENT}"
    msgs = p.server_rx.wait_for(senders * per, timeout=30, rule=R_CONCURRENT)
    for tag in range(senders):
        seq = [int.from_bytes(m[2], "big") for m in msgs if m[1]["t"] == tag]
        assert seq == list(range(per)), _order_report(seq, per, f"sender thread {tag}") + f"; {R_CONCURRENT}"
    time.sleep(0.2)
    assert len(p.server_rx.messages) == senders * per, f"messages arrived twice; {R_CONCURRENT}"


def test_a_slow_receiver_bounds_the_senders_memory(net: Net):
    chunk_count, chunk = 200, MIB
    bound = 100 * MIB
    p = net.pair(server_kw={"queue_bytes": 4 * MIB, "queue_frames": 64})
    p.server_rx.gate = threading.Event()
    buf = bytearray(chunk)  # a writable buffer, reused: a driver that queues must copy it
    sent = [0]
    failure: list = []

    def send() -> None:
        try:
            for i in range(chunk_count):
                buf[:4] = i.to_bytes(4, "big")
                p.client.send_message(p.to_server, APP, None, buf)
                sent[0] += 1
        except Exception as e:
            failure.append(e)

    rss0 = rss_bytes()
    peak = rss0
    sender = threading.Thread(target=send, name="sfm-conformance-sender")
    sender.start()
    try:
        last, since = -1, time.monotonic()
        while sender.is_alive() and time.monotonic() - since < 1.0:  # until the sender stalls for 1 s
            peak = max(peak, rss_bytes())
            if sent[0] != last:
                last, since = sent[0], time.monotonic()
            time.sleep(0.02)
        peak = max(peak, rss_bytes())
        stalled_at = sent[0]
    finally:
        p.server_rx.gate.set()
    sender.join(scaled(60))
    assert not failure, f"send_message raised {failure[0]!r} while the receiver was slow; {R_BACKPRESSURE}"
    grown = peak - rss0
    assert grown < bound, (
        f"with a receiver that takes nothing, {stalled_at} MiB were accepted and this process grew by "
        f"{grown // MIB} MiB (bound {bound // MIB} MiB): the driver buffers what the peer does not read; "
        f"{R_BACKPRESSURE}"
    )
    got = numbered(p.server_rx.wait_for(chunk_count, timeout=60, rule=R_BACKPRESSURE))
    assert got == list(range(chunk_count)), _order_report(got, chunk_count, "after the receiver caught up")


def test_a_send_blocked_on_a_full_transport_ends_when_the_connection_closes(net: Net):
    p = net.pair(server_kw={"queue_bytes": 4 * MIB, "queue_frames": 64})
    p.server_rx.gate = threading.Event()  # the receiver takes nothing: the transport fills
    [sfm_conn] = p.client.get_connections(net.tls.server_name)
    payload, cap = bytes(MIB), 200
    sent = [0]
    ended: list = []

    def send() -> None:
        try:
            for _ in range(cap):  # on this one connection (not the endpoint: it reconnects)
                sfm_conn.send_data(APP, 1, None, payload)
                sent[0] += 1
        except Exception as e:
            ended.append(e)

    sender = threading.Thread(target=send, name="sfm-conformance-blocked-sender", daemon=True)
    sender.start()
    try:
        last, since = -1, time.monotonic()
        while sender.is_alive() and time.monotonic() - since < scaled(1.0):  # until the sender stalls
            if sent[0] != last:
                last, since = sent[0], time.monotonic()
            time.sleep(0.02)
        assert sender.is_alive(), (
            f"the sender never blocked: {sent[0]} MiB taken, then {ended[0]!r}; {R_BACKPRESSURE}"
            if ended
            else f"{cap} MiB were taken by a receiver that takes nothing, and send_frame never blocked; "
            f"{R_BACKPRESSURE}"
        )
        at_close = sent[0]
        closer = threading.Thread(target=sfm_conn.conn.close, name="sfm-conformance-closer", daemon=True)
        closer.start()  # from another thread than the blocked sender's
        limit = scaled(15)
        closer.join(limit)
        assert not closer.is_alive(), f"close() did not return within {limit:.0f} s while a send was blocked; {R_CLOSE}"
        sender.join(limit)
        assert not sender.is_alive(), (
            f"a send blocked on a full transport was still blocked {limit:.0f} s after close() ({at_close} MiB had "
            f"been taken); {R_SEND_BLOCKED_CLOSED}"
        )
    finally:
        p.server_rx.gate.set()
        sender.join(scaled(15))
    assert sent[0] == at_close, (
        f"the send blocked at close() returned as if sent instead of raising; {R_SEND_BLOCKED_CLOSED}"
    )
    [e] = ended
    assert isinstance(e, CommError) and e.code in (CommError.CLOSED, CommError.TIMEOUT), (
        f"the blocked send ended with {e!r}; {R_SEND_BLOCKED_CLOSED}"
    )


def test_the_active_side_reconnects_after_the_listener_restarts(net: Net):
    """The listener (another process) stops, then crashes; each time a new one comes up on the
    URL the first one reported, and the active side comes back by itself."""
    first = net.child()
    url = first.url
    client = net.manager(net.tls.client_name)
    got = Collector()
    client.register_message_receiver(APP, got)
    log = StateLog()
    client.add_endpoint_monitor(log)
    net.connect(client, url)
    ready(client, net.tls.server_name, f"connecting to {url}")
    previous = first
    for round_, how in enumerate(("stopped", "killed"), start=1):
        if how == "stopped":
            previous.stop()
        else:
            previous.kill()
        gone(client, net.tls.server_name, f"the active side after its listener was {how}", R_CLOSE)
        again = net.child(url)
        ep = ready(
            client,
            net.tls.server_name,
            f"the active side reconnecting to {url} after the listener was {how} and started again",
            timeout=15,
        )
        client.send_message(ep, APP, {"round": round_}, b"back")
        wait_until(lambda r=round_: any(m[1] == {"round": r} for m in got.messages), 10, "the echo", R_RECONNECT)
        previous = again
    states = [s for name, s in log.events if name == net.tls.server_name]
    expected = [EndpointState.READY, EndpointState.DISCONNECTED] * 2 + [EndpointState.READY]
    assert states == expected, f"the active side's monitor saw {[s.name for s in states]}; {R_CLOSE}"


@pytest.mark.parametrize("side", ["active", "passive"])
def test_close_from_either_side_reaches_the_other(net: Net, side: str):
    p = net.pair()
    closer, other = (p.client, p.server) if side == "active" else (p.server, p.client)
    logs = {p.client: StateLog(), p.server: StateLog()}
    for manager, log in logs.items():
        manager.add_endpoint_monitor(log)
    other_side = "passive" if side == "active" else "active"
    [sfm_conn] = closer.get_connections(other.local_endpoint.name)
    [far_end] = other.get_connections(closer.local_endpoint.name)
    conn = sfm_conn.conn
    conn.close()
    conn.close()  # idempotent
    wait_until(
        lambda: (
            (closer.local_endpoint.name, EndpointState.DISCONNECTED) in logs[other].events
            # The active side may reconnect, and its new connection replace the old one on the
            # passive side, before the old one's end is seen there: then its driver connection
            # must be reported closed all the same.
            or far_end.conn.state == ConnState.CLOSED
        ),
        10,
        f"the {other_side} side to see its connection to {closer.local_endpoint.name!r} end after the {side} "
        "side closed it",
        R_CLOSE,
    )
    peer = other.local_endpoint.name
    wait_until(
        lambda: (
            (peer, EndpointState.DISCONNECTED) in logs[closer].events
            # The active side may reconnect, and its new connection be recorded on the passive
            # side, before the closed one was removed there: the endpoint then rightly stays
            # READY, but the closed connection must be gone from the core all the same.
            or (conn.state == ConnState.CLOSED and sfm_conn not in (closer.get_connections(peer) or []))
        ),
        10,
        f"the closer to see {peer!r} DISCONNECTED (or its closed connection removed) after it closed it",
        R_CLOSE,
    )
    try:
        conn.send_frame(encode_frame(FrameType.DATA, APP, 17, None, b"late"))
    except CommError as e:
        assert e.code in (CommError.CLOSED, CommError.TIMEOUT), f"send_frame after close raised {e}; {R_SEND_CLOSED}"
    except Exception as e:
        raise AssertionError(f"send_frame after close raised {type(e).__name__}: {e}; {R_SEND_CLOSED}") from None
    else:
        raise AssertionError(f"send_frame after close returned without an error; {R_SEND_CLOSED}")
    # The active side reconnects by itself; the pair works again.
    for manager, log in logs.items():
        wait_until(
            # (No event at all: the reconnection replaced the closed connection before its end
            # was seen, and the endpoint never stopped being READY.)
            lambda log=log: log.events[-1][1] == EndpointState.READY if log.events else True,
            15,
            f"{manager.local_endpoint.name} to see its peer READY again after the close",
            R_RECONNECT,
        )
    to_server = ready(p.client, net.tls.server_name, "the active side reconnecting after the close")
    p.client.send_message(to_server, APP, {"after": "close"}, b"again")
    p.server_rx.wait_for(1, rule=R_RECONNECT)


@pytest.mark.parametrize("when", ["before the handshake", "after the handshake"])
def test_a_bad_frame_closes_only_its_connection(net: Net, when: str):
    p = net.pair()
    driver, log, _connector, _errors = net.bare_driver(p.url, Mode.ACTIVE)
    wait_until(lambda: log.connected, 10, f"a bare {net.scheme} driver to connect to {p.url}", R_HANDSHAKE)
    conn = log.connected[0]
    if when == "after the handshake":
        conn.send_frame(encode_frame(FrameType.HELLO, 0, 1, None, build_handshake(f"{net.tls.client_name}.bad", {})))
        wait_until(lambda: log.frames, 10, "READY to a bare driver's HELLO", R_HANDSHAKE)
        # DATA whose headers are no MessagePack map (0xc1 is never used by MessagePack).
        bad = PREFIX.pack(PREFIX.size + 3, 3, FrameType.DATA, 0, 0, APP, 17, 1) + b"\xc1\xc1\xc1"
    else:
        # A prefix whose header_len exceeds its own length: impossible in every framing.
        bad = PREFIX.pack(PREFIX.size, 5, FrameType.DATA, 0, 0, APP, 17, 1)
    try:
        conn.send_frame(bad)
    except CommError:
        pass  # the listener may close it before the send completes
    wait_until(
        lambda: log.closed,
        10,
        f"the listener to close a connection that sent a bad frame {when}",
        R_BAD_FRAME + "; " + R_CLOSE,
    )
    assert p.server.find_endpoint(net.tls.client_name) is not None, (
        f"a bad frame on another connection closed the good one too; {R_BAD_FRAME}"
    )
    p.client.send_message(p.to_server, APP, {"still": "up"}, b"after the bad frame")
    p.server.send_message(p.to_client, APP, {"still": "up"}, b"after the bad frame")
    p.server_rx.wait_for(1, rule=R_BAD_FRAME)
    p.client_rx.wait_for(1, rule=R_BAD_FRAME)


@pytest.mark.parametrize("silent", ["active", "passive"])
def test_the_handshake_timeout_closes_a_silent_connection(net: Net, silent: str):
    """A peer that connects and never says HELLO (or never answers it with READY) is closed
    after the handshake timeout, and the driver tells the silent side."""
    kw = {"handshake_timeout": 1.0, "heartbeat_check": 0.1}
    if silent == "active":
        server = net.manager(net.tls.server_name, **kw)
        url = net.listen(server)
        _driver, log, _c, _e = net.bare_driver(url, Mode.ACTIVE)
        what = "the listener to close a connection that never sent HELLO"
    else:
        _driver, log, connector, _e = net.bare_driver(net.listen_url(), Mode.PASSIVE)
        try:
            url = connector.wait_listening(scaled(10))
        except CommError as e:
            raise AssertionError(f"a bare driver could not listen: {e}; {R_LISTEN}") from None
        client = net.manager(net.tls.client_name, **kw)
        net.connect(client, url)
        what = "the active side to close a connection whose HELLO was never answered"
    wait_until(lambda: log.connected, 10, f"a connection to {url}", R_HANDSHAKE)
    t0 = time.monotonic()
    wait_until(lambda: log.closed, 10, what, R_HANDSHAKE_TIMEOUT)
    assert time.monotonic() - t0 >= 0.5, f"closed before the 1 s handshake timeout; {R_HANDSHAKE_TIMEOUT}"


def test_fan_in_of_many_endpoints(net: Net):
    n = 50
    server = net.manager(net.tls.server_name)
    rx = Collector()
    server.register_message_receiver(APP, rx)
    url = net.listen(server)
    clients = []
    for i in range(n):
        c = net.manager(f"{net.tls.client_name}.c{i}", delivery_workers=1)
        net.connect(c, url)
        clients.append(c)
    for i, c in enumerate(clients):
        ep = ready(c, net.tls.server_name, f"endpoint {i + 1} of {n} connecting at once", timeout=30)
        c.send_message(ep, APP, {"i": i}, b"fan-in")
    msgs = rx.wait_for(n, timeout=30, rule=R_FANIN)
    assert sorted(m[1]["i"] for m in msgs) == list(range(n)), f"not one message from each of {n} endpoints; {R_FANIN}"
    assert len({m[0] for m in msgs}) == n, f"{n} endpoints were not told apart; {R_FANIN}"


def test_stop_leaves_no_thread_descriptor_or_socket_file(net: Net, capabilities: dict):
    extra = tuple(capabilities.get("process_global_threads") or ())

    def run_once() -> str:
        p = net.pair()
        p.client.send_message(p.to_server, APP, None, b"x")
        p.server.send_message(p.to_client, APP, None, b"y")
        p.server_rx.wait_for(1)
        p.client_rx.wait_for(1)
        p.client.stop()
        p.server.stop()
        return p.url

    run_once()  # warm up: what a library starts once per process is not a leak
    time.sleep(0.2)
    threads0, fds0 = threads(extra), open_fds()
    url = run_once()
    deadline = time.monotonic() + scaled(5)
    while True:
        new_threads = threads(extra) - threads0
        new_fds = {fd: what for fd, what in open_fds().items() if fds0.get(fd) != what}
        if (not new_threads and not new_fds) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not new_threads, f"threads left running after stop(): {sorted(t.name for t in new_threads)}; {R_STOP}"
    assert not new_fds, f"descriptors left open after stop(): {sorted(new_fds.items())}; {R_STOP}"
    left = socket_files(net.directory)
    path = parse_url(url).get("path")
    if path and os.path.exists(path):
        left.append(path)
    assert not left, f"socket files left after stop(): {left}; {R_STOP}"


@pytest.mark.parametrize("size", [1000, 200_000])
def test_send_frame_leaves_the_callers_buffer_free_to_reuse(net: Net, size: int):
    p = net.pair()
    n = 40
    for what, sender, to, rx in (
        ("active to passive", p.client, p.to_server, p.server_rx),
        ("passive to active", p.server, p.to_client, p.client_rx),
    ):
        buf = bytearray(size)
        view = memoryview(buf)
        for i in range(n):
            buf[:] = bytes([i]) * size  # fill, send, refill at once: normal buffer reuse
            sender.send_message(to, APP, {"i": i}, view if i % 2 else buf)
        buf[:] = b"\xff" * size
        msgs = rx.wait_for(n, timeout=20, rule=R_REUSE)
        wrong = [m[1]["i"] for m in msgs if m[2] != bytes([m[1]["i"]]) * size]
        assert not wrong, (
            f"{what}: messages {wrong[:10]} arrived with bytes written into the buffer after send returned "
            f"({size}-byte payloads); {R_REUSE}"
        )
