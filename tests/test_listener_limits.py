"""A listener's connection limits: ``max_connections`` and ``max_handshakes``, on every scheme.

Past a limit a new connection is closed at once (its peer sees the end of the stream well
before any handshake timeout), the log names the limit, and the connections already held
are not touched; once a slot is free, a new connection is served again.
"""

from __future__ import annotations

import logging
import socket

import pytest
from helpers import scaled, wait_ready, wait_until

from sfm_core import CommError, ConnManager, Endpoint, Mode
from sfm_core.limits import ListenerLimits
from sfm_core.pki import make_pki

SCHEMES = ["tcp", "stcp", "ws", "wss", "http", "https", "grpc", "grpcs"]
SECURE = {"stcp", "wss", "https", "grpcs"}
# Long enough that no handshake timeout closes anything while a test runs.
LONG = 60.0


# -- the counting, without sockets --------------------------------------------------------


def test_slots_count_connections_and_handshakes() -> None:
    limits = ListenerLimits(max_connections=3, max_handshakes=2)
    a, b = limits.admit("a"), limits.admit("b")
    assert a is not None and b is not None
    assert limits.admit("c") is None  # two in their handshake
    a.handshaken()
    a.handshaken()  # idempotent
    c = limits.admit("c")
    assert c is not None and (limits.connections, limits.handshaking) == (3, 2)
    c.handshaken()
    assert limits.admit("d") is None  # three open
    b.release()
    b.release()
    assert (limits.connections, limits.handshaking) == (2, 0)
    a.release()
    c.release()
    assert (limits.connections, limits.handshaking, limits.refused) == (0, 0, 2)


def test_a_flood_of_refusals_logs_one_line_per_interval(caplog) -> None:
    limits = ListenerLimits(max_connections=1, max_handshakes=1, name="tcp listener CH1")
    slot = limits.admit("x")
    with caplog.at_level(logging.WARNING, logger="sfm_core.limits"):
        for i in range(100):
            assert limits.admit(f"10.0.0.{i}") is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "tcp listener CH1: refusing a connection from 10.0.0.0: max_connections=1" in lines[0]
    assert limits.refused == 100
    assert slot is not None
    slot.release()


@pytest.mark.parametrize(
    ("key", "value"), [("max_connections", 0), ("max_connections", "many"), ("max_handshakes", -1)]
)
def test_a_bad_limit_is_reported_by_add_connector(key: str, value: object) -> None:
    manager = ConnManager(Endpoint("srv"))
    try:
        with pytest.raises(CommError) as err:
            manager.add_connector("tcp://127.0.0.1:0", {key: value}, Mode.PASSIVE)
        assert err.value.code == CommError.BAD_CONFIG
        assert key in err.value.message
    finally:
        manager.stop()


# -- on every scheme ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("pki")), "srv", "site-1")


@pytest.fixture
def managers():
    made: list[ConnManager] = []

    def make(name: str) -> ConnManager:
        manager = ConnManager(Endpoint(name), handshake_timeout=LONG)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.stop()


def _listener(make, pki, scheme: str, **limits: int) -> tuple[ConnManager, str, ListenerLimits]:
    # Each scheme gets only the parameters its driver declares: a listener refuses others.
    params: dict = {**limits, "tls_handshake_timeout": LONG}
    if scheme in ("ws", "wss", "http", "https"):
        params["open_timeout"] = LONG
    if scheme in ("grpc", "grpcs"):
        params["handshake_timeout"] = LONG
    if scheme in SECURE:
        # Server-only TLS: the clients here need no certificates of their own.
        params.update(pki.server, connection_security="tls")
    server = make("srv")
    handle = server.add_connector(f"{scheme}://127.0.0.1:0", params, Mode.PASSIVE)
    server.start()
    url = server.wait_listening(handle)
    connector_limits = server.get_connector(handle).limits
    assert connector_limits is not None
    return server, url, connector_limits


def _client(make, pki, scheme: str, name: str, url: str) -> ConnManager:
    client = make(name)
    params = {"ca_cert": pki.client["ca_cert"], "connection_security": "tls"} if scheme in SECURE else {}
    client.add_connector(url, params, Mode.ACTIVE)
    client.start()
    return client


def _raw(url: str) -> socket.socket:
    port = int(url.rsplit(":", 1)[1].split("/")[0].split("?")[0])
    return socket.create_connection(("127.0.0.1", port), timeout=scaled(5))


def _closed_at_once(sock: socket.socket) -> bool:
    """The listener ends this connection (EOF or reset) before scaled(5) s: long before any
    handshake timeout of these tests would."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize(
    "scheme",
    [
        pytest.param(
            s,
            marks=pytest.mark.skip(
                reason="gRPC core owns a connection until it opens a stream: silent sockets are bounded by "
                "max_connections (grpc.max_allowed_incoming_connections) and handshake_timeout instead"
            ),
        )
        if s.startswith("grpc")
        else s
        for s in SCHEMES
    ],
)
def test_past_max_handshakes_a_new_connection_is_closed_at_once(managers, pki, scheme: str, caplog) -> None:
    _server, url, limits = _listener(managers, pki, scheme, max_handshakes=2)
    silent = [_raw(url), _raw(url)]
    try:
        wait_until(lambda: limits.handshaking == 2, what="two silent peers holding handshake slots")
        with caplog.at_level(logging.WARNING, logger="sfm_core.limits"):
            third = _raw(url)
            try:
                assert _closed_at_once(third), "a connection past max_handshakes was kept"
            finally:
                third.close()
        assert any("max_handshakes=2" in r.getMessage() for r in caplog.records)
        assert all(not _readable(s) for s in silent), "the connections already held were touched"
    finally:
        for s in silent:
            s.close()
    wait_until(lambda: limits.handshaking == 0 and limits.connections == 0, what="slots freed")
    client = _client(managers, pki, scheme, "site-1", url)
    wait_ready(client, "srv", timeout=10)
    wait_until(lambda: limits.handshaking == 0 and limits.connections == 1, what="one handshaken connection")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_past_max_connections_a_client_waits_for_a_free_slot(managers, pki, scheme: str, caplog) -> None:
    server, url, limits = _listener(managers, pki, scheme, max_connections=2)
    first = _client(managers, pki, scheme, "site-1", url)
    second = _client(managers, pki, scheme, "site-2", url)
    for name in ("site-1", "site-2"):
        wait_ready(server, name, timeout=10)
    with caplog.at_level(logging.WARNING):
        third = _raw(url)
        try:
            assert _closed_at_once(third), "a connection past max_connections was kept"
        finally:
            third.close()
        late = _client(managers, pki, scheme, "site-3", url)
        if scheme.startswith("grpc"):
            # gRPC core refuses it at accept(), before the listener's own count sees it.
            wait_until(lambda: any(c.error for c in late.connectors.values()), timeout=10, what="late refused")
        else:
            wait_until(lambda: limits.refused >= 2, timeout=10, what="the late client refused")
            assert any("max_connections=2" in r.getMessage() for r in caplog.records)
    assert server.find_endpoint("site-3") is None
    for name in ("site-1", "site-2"):
        wait_ready(server, name)  # untouched
    first.stop()
    # The late client reconnects (with backoff) and is served once a slot is free.
    wait_ready(server, "site-3", timeout=30)
    wait_ready(late, "srv")
    assert second.find_endpoint("srv") is not None


def _readable(sock: socket.socket) -> bool:
    """Whether the listener wrote to or closed ``sock`` (it should have done neither)."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)
