"""TLS on the TCP driver (``stcp://``, ``tcp://`` with ``secure=true``) over real loopback ConnManagers:
mutual TLS, what is refused and how it is told, a silent or trickling handshake, mistakes named at
add_connector, and reload_tls."""

from __future__ import annotations

import datetime
import logging
import os
import socket
import ssl
import threading
import time

import pytest
import trustme
from helpers import Collector, StateLog, closed_by_peer, scaled, wait_ready, wait_until
from sfm_driver_tcp import TcpDriver

from sfm_core import CommError, ConnManager, Endpoint, EndpointState, Mode, get_registry
from sfm_core.url import parse_url

# -- certificates --------------------------------------------------------------------------


class Pki:
    """A CA, a server certificate (CN ``server``, for localhost and 127.0.0.1) and client
    certificates with the endpoint name as CN, written as PEM files."""

    def __init__(self, root) -> None:
        self.root = root
        self.ca = trustme.CA()
        self.ca_cert = self._write("ca.pem", self.ca.cert_pem)
        self.server_cert, self.server_key = self.issue("server", "localhost", "127.0.0.1", cn="server")

    def _write(self, name: str, blob) -> str:
        path = str(self.root / name)
        blob.write_to_path(path)
        return path

    def issue(self, name: str, *identities: str, cn: str, ca: trustme.CA | None = None, **kw) -> tuple[str, str]:
        cert = (ca or self.ca).issue_cert(*(identities or (cn,)), common_name=cn, **kw)
        return self._write(f"{name}.pem", cert.cert_chain_pems[0]), self._write(f"{name}.key", cert.private_key_pem)

    def server(self, **extra) -> dict:
        return {"ca_cert": self.ca_cert, "server_cert": self.server_cert, "server_key": self.server_key, **extra}

    def client(self, name: str, **extra) -> dict:
        path = self.root / f"{name}.pem"
        cert, key = (str(path), str(self.root / f"{name}.key")) if path.exists() else self.issue(name, cn=name)
        return {"ca_cert": self.ca_cert, "client_cert": cert, "client_key": key, **extra}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def managers():
    """Factory for ConnManagers; every one is stopped at teardown."""
    made: list[ConnManager] = []

    def make(name: str, **kwargs) -> ConnManager:
        m = ConnManager(Endpoint(name), **kwargs)
        made.append(m)
        return m

    yield make
    for m in made:
        m.stop()


def listen(manager: ConnManager, params: dict, url: str = "stcp://127.0.0.1:0") -> str:
    handle = manager.add_connector(url, params, Mode.PASSIVE)
    manager.start()
    return manager.wait_listening(handle, scaled(5))


def connect(manager: ConnManager, url: str, params: dict) -> str:
    handle = manager.add_connector(url, params, Mode.ACTIVE)
    manager.start()
    return handle


def pair(managers, pki: Pki, server_params: dict | None = None, client_params: dict | None = None):
    server = managers("server")
    client = managers("site-1")
    url = listen(server, pki.server() if server_params is None else server_params)
    connect(client, url, pki.client("site-1") if client_params is None else client_params)
    return server, client, wait_ready(client, "server"), wait_ready(server, "site-1")


class Chatter:
    """A client that keeps sending numbered messages to the server on its own thread, so a
    test can check the listener kept serving it while something else went on."""

    def __init__(self, client: ConnManager, server: ConnManager, to_server: Endpoint, app_id: int = 9) -> None:
        self.got = Collector()
        server.register_message_receiver(app_id, self.got)
        self.client, self.to_server, self.app_id = client, to_server, app_id
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-chatter")
        self.conns = client.get_connections("server")

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.client.send_message(self.to_server, self.app_id, None, self.sent.to_bytes(4, "big"))
            self.sent += 1

    def __enter__(self) -> Chatter:
        self._thread.start()
        return self

    def received(self) -> int:
        return len(self.got.messages)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def check(self) -> None:
        """Every message arrived, in order, on the connection that was there at the start."""
        msgs = self.got.wait_for(self.sent)
        assert [int.from_bytes(m[3], "big") for m in msgs] == list(range(self.sent))
        assert self.client.get_connections("server") == self.conns


# -- mutual TLS ------------------------------------------------------------------------------


def test_stcp_is_served_by_the_tcp_driver_with_tls() -> None:
    assert get_registry().get_driver_class("stcp") is TcpDriver
    assert "stcp" in TcpDriver.supported_transports()
    assert TcpDriver.capabilities()["tls"] is True


def test_mutual_tls_messages_of_every_size_both_ways(managers, pki) -> None:
    server, client, to_server, to_client = pair(managers, pki)
    for props, cn in ((to_client.conn_props, "site-1"), (to_server.conn_props, "server")):
        assert props["peer_cn"] == cn
        assert props["tls_version"] in ("TLSv1.2", "TLSv1.3")
        assert props["tls_cipher"]
        assert props["identity_binding"] is True
        assert props["peer_addr"].startswith("127.0.0.1:")
    got_s, got_c = Collector(), Collector()
    server.register_message_receiver(1, got_s)
    client.register_message_receiver(1, got_c)
    headers = {"s": "str", "i": -7, "b": b"\x00\xff"}
    client.send_message(to_server, 1, headers, b"bytes")
    client.send_message(to_server, 1, None, b"")
    client.send_message(to_server, 1, None, None)
    client.send_message(to_server, 1, None, [b"li", bytearray(b"st"), memoryview(b"!")])
    server.send_message(to_client, 1, headers, b"back")
    assert [(m[2], m[3]) for m in got_s.wait_for(4)] == [
        (headers, b"bytes"),
        (None, None),
        (None, None),
        (None, b"list!"),
    ]
    assert got_c.wait_for(1)[0][2:4] == (headers, b"back")
    mid = os.urandom(16 << 20)
    big = os.urandom(1 << 20) * 64 + b"tail"  # 64 MiB and a bit, not a multiple of any buffer
    client.send_message(to_server, 1, {"n": 16}, mid)
    server.send_message(to_client, 1, {"n": 64}, big)
    client.send_message(to_server, 1, {"n": 64}, memoryview(big)[1:])
    server.send_message(to_client, 1, {"n": 16}, mid)
    received = got_s.wait_for(6, timeout=60)[4:]
    assert [m[2]["n"] for m in received] == [16, 64]
    assert received[0][3] == mid and received[1][3] == big[1:]
    received = got_c.wait_for(3, timeout=60)[1:]
    assert received[0][3] == big and received[1][3] == mid


def test_thousands_of_small_messages_arrive_in_order(managers, pki) -> None:
    server, client, to_server, to_client = pair(managers, pki)
    got_s, got_c = Collector(), Collector()
    server.register_message_receiver(1, got_s)
    client.register_message_receiver(1, got_c)
    n = 5000
    for i in range(n):
        client.send_message(to_server, 1, None, i.to_bytes(4, "big"))
        server.send_message(to_client, 1, None, i.to_bytes(4, "big"))
    for got in (got_s, got_c):
        assert [int.from_bytes(m[3], "big") for m in got.wait_for(n, timeout=30)] == list(range(n))


def test_tcp_with_secure_true_is_tls_and_reports_an_stcp_url(managers, pki) -> None:
    server = managers("server")
    url = listen(server, pki.server(secure="true"), url="tcp://127.0.0.1:0")
    assert url.startswith("stcp://127.0.0.1:")
    client = managers("site-1")
    connect(client, "tcp://" + url.removeprefix("stcp://"), pki.client("site-1", secure=True))
    assert wait_ready(server, "site-1").conn_props["peer_cn"] == "site-1"


def test_connection_security_tls_authenticates_the_server_only(managers, pki) -> None:
    server, client, to_server, to_client = pair(
        managers,
        pki,
        server_params={"server_cert": pki.server_cert, "server_key": pki.server_key, "connection_security": "tls"},
        client_params={"ca_cert": pki.ca_cert, "connection_security": "tls"},
    )
    assert to_client.conn_props["peer_cn"] is None
    assert to_client.conn_props["identity_binding"] is False
    assert to_server.conn_props["peer_cn"] == "server"
    got = Collector()
    server.register_message_receiver(1, got)
    client.send_message(to_server, 1, None, b"hi")
    assert got.wait_for(1)[0][3] == b"hi"


def test_check_hostname_is_off_by_default_and_on_when_asked(managers, pki) -> None:
    # A server certificate for another name: accepted unless check_hostname=true.
    cert, key = pki.issue("elsewhere", "elsewhere.example", cn="server")
    server = managers("server")
    url = listen(server, {"ca_cert": pki.ca_cert, "server_cert": cert, "server_key": key})
    lax = managers("site-1")
    connect(lax, url, pki.client("site-1"))
    wait_ready(lax, "server")
    strict = managers("site-2", reconnect_min=0.05, reconnect_max=0.2)
    handle = connect(strict, url, pki.client("site-2", check_hostname="true"))
    wait_until(lambda: strict.get_connector(handle).error is not None, what="hostname refused")
    assert "certificate is refused" in str(strict.get_connector(handle).error)
    assert "mismatch, certificate is not valid for '127.0.0.1'" in str(strict.get_connector(handle).error)
    assert strict.find_endpoint("server") is None


def test_check_hostname_accepts_the_right_name(managers, pki) -> None:
    server = managers("server")
    url = listen(server, pki.server())
    client = managers("site-1")
    connect(client, url, pki.client("site-1", check_hostname="true"))  # the server cert has 127.0.0.1
    wait_ready(client, "server")


def test_the_active_side_checks_the_server_name_against_its_certificate(managers, pki, caplog) -> None:
    server = managers("impostor")  # its certificate says CN=server
    url = listen(server, pki.server())
    client = managers("site-1", reconnect_min=0.05, reconnect_max=0.2)
    connect(client, url, pki.client("site-1"))
    wait_until(lambda: "but its certificate is for 'server'" in caplog.text, what="the client refusing the server")
    assert client.find_endpoint("impostor") is None


# -- refusals: each is told clearly, and a good client on the same listener goes on -----------


def _other_ca_client(pki: Pki, tmp_path) -> dict:
    cert, key = pki.issue("site-2-other-ca", "site-2", cn="site-2", ca=trustme.CA())
    return {"ca_cert": pki.ca_cert, "client_cert": cert, "client_key": key}


def _expired_client(pki: Pki, tmp_path) -> dict:
    now = datetime.datetime.now(datetime.UTC)
    cert, key = pki.issue(
        "site-2-expired",
        "site-2",
        cn="site-2",
        not_before=now - datetime.timedelta(days=10),
        not_after=now - datetime.timedelta(days=1),
    )
    return {"ca_cert": pki.ca_cert, "client_cert": cert, "client_key": key}


def _no_cert_client(pki: Pki, tmp_path) -> dict:
    return {"ca_cert": pki.ca_cert, "connection_security": "tls"}


def _wrong_cn_client(pki: Pki, tmp_path) -> dict:
    return pki.client("site-3")  # CN=site-3, while this client calls itself site-2


REFUSALS = {
    # case: (client params, client URL scheme, what the server logs, what the client logs or raises)
    "another CA": (_other_ca_client, "stcp", "certificate is refused", "TLSV1_ALERT_UNKNOWN_CA"),
    "expired": (_expired_client, "stcp", "certificate has expired", "CERTIFICATE_EXPIRED"),
    "no client cert": (_no_cert_client, "stcp", "sent no certificate", "ALERT_CERTIFICATE_REQUIRED"),
    "CN not the claimed name": (_wrong_cn_client, "stcp", "certificate is for 'site-3'", None),
    "plaintext client": (lambda pki, tmp_path: {}, "tcp", "not TLS", "answered in TLS"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_refused_client_never_gets_ready_and_a_good_one_goes_on(managers, pki, tmp_path, caplog, case) -> None:
    caplog.set_level(logging.INFO)
    make_params, scheme, server_says, client_says = REFUSALS[case]
    server, good, to_server, _ = pair(managers, pki)
    seen = StateLog()
    server.add_endpoint_monitor(seen)
    port = parse_url(server.connectors[next(iter(server.connectors))].url)["port"]
    bad = managers("site-2", reconnect_min=0.05, reconnect_max=0.2)
    bad_seen = StateLog()
    bad.add_endpoint_monitor(bad_seen)
    with Chatter(good, server, to_server) as chatter:
        before = chatter.received()
        handle = connect(bad, f"{scheme}://127.0.0.1:{port}", make_params(pki, tmp_path))
        wait_until(lambda: server_says in caplog.text, what=f"the server logging {server_says!r}")
        if client_says is not None:
            wait_until(
                lambda: client_says in caplog.text or client_says in str(bad.get_connector(handle).error),
                what=f"the client logging {client_says!r}",
            )
        wait_until(lambda: chatter.received() > before + 10, what="the good client served meanwhile")
    chatter.check()
    assert server.find_endpoint("site-2") is None
    assert [e for e in seen.events if e[0] == "site-2"] == []  # never READY on the server
    assert bad.find_endpoint("server") is None
    assert [e for e in bad_seen.events if e[1] == EndpointState.READY] == []
    assert server.find_endpoint("site-1").state == EndpointState.READY


def test_an_stcp_client_to_a_plaintext_listener_is_told_at_once(managers, pki, caplog) -> None:
    caplog.set_level(logging.INFO)
    server = managers("server")
    url = listen(server, {}, url="tcp://127.0.0.1:0")
    good = managers("site-1")
    connect(good, url, {})
    to_server = wait_ready(good, "server")
    tls_client = managers("site-2", reconnect_min=0.05, reconnect_max=0.2)
    with Chatter(good, server, to_server) as chatter:
        before = chatter.received()
        # A long handshake timeout: the error must come from what the server did, not from waiting.
        handle = connect(
            tls_client, "stcp://" + url.removeprefix("tcp://"), pki.client("site-2", tls_handshake_timeout=60)
        )
        wait_until(
            lambda: (
                "TLS ClientHello on a plaintext tcp listener: the client uses stcp:// or secure=true?" in caplog.text
            ),
            what="the plaintext listener's warning",
        )
        wait_until(lambda: tls_client.get_connector(handle).error is not None, what="the TLS client's error")
        assert "the server is not speaking TLS" in str(tls_client.get_connector(handle).error)
        assert "the server is not speaking TLS" in caplog.text
        wait_until(lambda: chatter.received() > before + 10, what="the good client served meanwhile")
    chatter.check()
    assert server.find_endpoint("site-2") is None and tls_client.find_endpoint("server") is None
    warnings = [r for r in caplog.records if "TLS ClientHello" in r.getMessage()]
    assert warnings and all(r.levelno == logging.WARNING for r in warnings)


def test_an_stcp_client_to_a_silent_server_gives_up_after_the_handshake_timeout(managers, pki) -> None:
    # NVFlare's plaintext listener reads a ClientHello as the prefix of a ~369 MB frame and waits.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        client = managers("site-1", reconnect_min=10, reconnect_max=10)
        handle = connect(client, f"stcp://127.0.0.1:{port}", pki.client("site-1", tls_handshake_timeout=scaled(0.3)))
        accepted, _ = silent.accept()
        with accepted:
            wait_until(lambda: client.get_connector(handle).error is not None, what="the client giving up")
            error = str(client.get_connector(handle).error)
            assert "no TLS answer from the server within tls_handshake_timeout" in error
            assert "the server is not speaking TLS?" in error
            assert accepted.recv(1) == b"\x16"  # what it sent was a ClientHello


# -- a silent or slow handshake holds no pool thread ------------------------------------------


def test_an_idle_client_holds_nothing_and_is_closed_after_the_handshake_timeout(managers, pki, caplog) -> None:
    timeout = scaled(1.0)
    server = managers("server")
    url = listen(server, pki.server(io_threads=1, tls_handshake_timeout=timeout))  # one pool thread
    host, port = "127.0.0.1", parse_url(url)["port"]
    idle = socket.create_connection((host, port))
    try:
        opened = time.monotonic()
        client = managers("site-1")
        connect(client, url, pki.client("site-1"))
        to_server = wait_ready(client, "server")
        got = Collector()
        server.register_message_receiver(1, got)
        for i in range(10):
            client.send_message(to_server, 1, None, b"%d" % i)
        assert [m[3] for m in got.wait_for(10)] == [b"%d" % i for i in range(10)]
        assert closed_by_peer(idle, timeout=10)
        assert time.monotonic() - opened >= timeout * 0.9  # a lower bound only
    finally:
        idle.close()
    wait_until(lambda: "no TLS handshake within tls_handshake_timeout" in caplog.text, what="the timeout's log")
    assert server.find_endpoint("site-1").state == EndpointState.READY


def test_a_handshake_trickled_byte_by_byte_holds_no_pool_thread(managers, pki) -> None:
    server = managers("server")
    url = listen(server, pki.server(io_threads=1, tls_handshake_timeout=scaled(30)))
    port = parse_url(url)["port"]
    # A real client's handshake, sent one byte at a time.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca_cert)
    cert, key = pki.client("site-2")["client_cert"], pki.client("site-2")["client_key"]
    ctx.load_cert_chain(cert, key)
    ctx.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(scaled(10))
    trickling = threading.Event()
    stop = threading.Event()
    done = threading.Event()

    def trickle() -> None:
        try:
            while not stop.is_set():
                try:
                    tls.do_handshake()
                    done.set()
                    return
                except ssl.SSLWantReadError:
                    pass
                data = outgoing.read()
                for i in range(len(data)):
                    sock.send(data[i : i + 1])
                    trickling.set()
                    if stop.wait(0.002):
                        return
                incoming.write(sock.recv(65536))
        except OSError:
            pass

    t = threading.Thread(target=trickle, name="test-trickle")
    t.start()
    try:
        assert trickling.wait(scaled(5))
        client = managers("site-1")
        connect(client, url, pki.client("site-1"))
        to_server = wait_ready(client, "server")
        got = Collector()
        server.register_message_receiver(1, got)
        client.send_message(to_server, 1, None, b"meanwhile")
        assert got.wait_for(1)[0][3] == b"meanwhile"
        assert not done.is_set()  # served while the other handshake was still trickling in
        assert done.wait(scaled(20))  # and that one completes too, slow as it is
    finally:
        stop.set()
        t.join()
        sock.close()


# -- mistakes are named at add_connector ------------------------------------------------------


def test_mistakes_are_named_when_the_connector_is_added(managers, pki, tmp_path) -> None:
    m = managers("server")
    no_key = pki.server()
    del no_key["server_key"]
    with pytest.raises(CommError, match="missing: server_key") as err:
        m.add_connector("stcp://127.0.0.1:0", no_key, Mode.PASSIVE)
    assert err.value.code == CommError.BAD_CONFIG
    gone = str(tmp_path / "nowhere.pem")
    with pytest.raises(CommError, match=f"server_cert='{gone}' cannot be read") as err:
        m.add_connector("stcp://127.0.0.1:0", pki.server(server_cert=gone), Mode.PASSIVE)
    assert err.value.code == CommError.BAD_CONFIG
    _, other_key = pki.issue("unrelated", cn="unrelated")
    with pytest.raises(CommError, match="do not make a certificate and its key") as err:
        m.add_connector("stcp://127.0.0.1:0", pki.server(server_key=other_key), Mode.PASSIVE)
    assert "server_cert=" in err.value.message and other_key in err.value.message
    with pytest.raises(CommError, match="missing: client_cert, client_key"):
        m.add_connector("stcp://127.0.0.1:1", {"ca_cert": pki.ca_cert}, Mode.ACTIVE)
    with pytest.raises(CommError, match="tls_handshake_timeout='soon' is not a float"):
        m.add_connector("stcp://127.0.0.1:0", pki.server(tls_handshake_timeout="soon"), Mode.PASSIVE)
    with pytest.raises(CommError, match="send_timeout"):  # the TCP params are checked too
        m.add_connector("stcp://127.0.0.1:0", pki.server(send_timeout="x"), Mode.PASSIVE)
    assert m.connectors == {}


# -- reload_tls -------------------------------------------------------------------------------


def test_reload_tls_new_clients_use_the_new_files_and_a_live_connection_goes_on(managers, pki, tmp_path) -> None:
    live = Pki(tmp_path)  # the server's files, rewritten in place below
    server = managers("server")
    url = listen(server, live.server())
    old_client = managers("site-1")
    connect(old_client, url, live.client("site-1"))
    to_server = wait_ready(old_client, "server")
    got = Collector()
    server.register_message_receiver(1, got)
    old_client.send_message(to_server, 1, None, b"before")
    [first_conn] = old_client.get_connections("server")

    # A new CA: the server now presents a certificate from it and trusts only it.
    old_ca = tmp_path / "old-ca.pem"
    old_ca.write_bytes((tmp_path / "ca.pem").read_bytes())
    (tmp_path / "new").mkdir()
    new = Pki(tmp_path / "new")
    for name in ("ca.pem", "server.pem", "server.key"):
        (tmp_path / name).write_bytes((new.root / name).read_bytes())
    server.reload_tls()

    old_client.send_message(to_server, 1, None, b"after")
    assert [m[3] for m in got.wait_for(2)] == [b"before", b"after"]
    assert old_client.get_connections("server") == [first_conn]  # the live one went on

    stale = managers("site-2", reconnect_min=0.05, reconnect_max=0.2)  # still trusts the old CA
    handle = connect(stale, url, live.client("site-2", ca_cert=str(old_ca)))
    wait_until(lambda: stale.get_connector(handle).error is not None, what="the old CA refused")
    assert "certificate is refused" in str(stale.get_connector(handle).error)
    fresh = managers("site-3")
    connect(fresh, url, new.client("site-3"))
    assert wait_ready(server, "site-3").conn_props["peer_cn"] == "site-3"
    assert stale.find_endpoint("server") is None


def test_reload_tls_with_bad_files_keeps_the_old_ones(managers, pki, tmp_path) -> None:
    live = Pki(tmp_path)
    server = managers("server")
    url = listen(server, live.server())
    (tmp_path / "server.key").write_bytes(b"not a key")
    with pytest.raises(CommError, match="server_key") as err:
        server.reload_tls()
    assert err.value.code == CommError.BAD_CONFIG
    client = managers("site-1")
    connect(client, url, live.client("site-1"))
    wait_ready(client, "server")  # new connections still get the old, good files
