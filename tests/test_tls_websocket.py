"""TLS on the WebSocket driver (wss://, https://, secure=true) over real loopback ConnManagers.

Certificates come from trustme: one CA for the deployment, server certificates with CN
"server" (the server endpoint's name) and client certificates whose CN is the client
endpoint's name, as NVFlare provisions them.
"""

from __future__ import annotations

import datetime
import logging
import socket
import threading
from pathlib import Path

import pytest
from helpers import Collector, StateLog, closed_by_peer, scaled, wait_ready, wait_until

from sfm_core import CommError, ConnectorInfo, ConnManager, Endpoint, EndpointState, Mode
from sfm_core.url import parse_url

trustme = pytest.importorskip("trustme")
WebSocketDriver = pytest.importorskip("sfm_driver_websocket").WebSocketDriver

TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")


# -- certificates ----------------------------------------------------------------------------


class Pki:
    """PEM files in a directory: CAs and the certificates they issue."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = trustme.CA()
        self.other_ca = trustme.CA()
        self.ca_file = self.write_ca(self.ca, "ca")
        self.other_ca_file = self.write_ca(self.other_ca, "other-ca")
        self.server = self.leaf(self.ca, "server", "localhost", "127.0.0.1")

    def write_ca(self, ca, name: str) -> str:
        path = self.root / f"{name}.pem"
        ca.cert_pem.write_to_path(str(path))
        return str(path)

    def leaf(self, ca, cn: str, *identities: str, tag: str = "", **kwargs) -> tuple[str, str]:
        """(cert file, key file) of a certificate with common name ``cn`` issued by ``ca``."""
        cert = ca.issue_cert(*(identities or (cn,)), common_name=cn, **kwargs)
        stem = self.root / f"{cn}{tag}"
        cert.cert_chain_pems[0].write_to_path(f"{stem}.crt")
        cert.private_key_pem.write_to_path(f"{stem}.key")
        return f"{stem}.crt", f"{stem}.key"

    def server_params(self, **extra) -> dict:
        cert, key = self.server
        return {"ca_cert": self.ca_file, "server_cert": cert, "server_key": key, **extra}

    def client_params(self, cn: str = "site-1", ca=None, ca_file: str | None = None, **extra) -> dict:
        cert, key = self.leaf(ca or self.ca, cn)
        return {"ca_cert": ca_file or self.ca_file, "client_cert": cert, "client_key": key, **extra}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


# -- managers ------------------------------------------------------------------------------


@pytest.fixture
def managers():
    made: list[ConnManager] = []

    def make(name: str, **kwargs) -> ConnManager:
        cm = ConnManager(Endpoint(name, {"role": name}), **kwargs)
        made.append(cm)
        return cm

    yield make
    for cm in reversed(made):
        cm.stop()


def serve(make, scheme: str, params: dict) -> tuple[ConnManager, str, Collector]:
    server = make("server")
    col = Collector()
    server.register_message_receiver(1, col)
    h = server.add_connector(f"{scheme}://127.0.0.1:0", params, Mode.PASSIVE)
    server.start()
    return server, server.wait_listening(h, scaled(10)), col


def client_of(make, name: str, url: str, params: dict, monitor: StateLog | None = None):
    client = make(name)
    col = Collector()
    client.register_message_receiver(1, col)
    if monitor is not None:
        client.add_endpoint_monitor(monitor)
    client.add_connector(url, params, Mode.ACTIVE)
    client.start()
    return client, col


def exchange(server: ConnManager, client: ConnManager, scol: Collector, ccol: Collector, tag: bytes) -> None:
    """One message each way between a READY pair, waited for."""
    name = client.local_endpoint.name
    n_server, n_client = len(scol.messages), len(ccol.messages)
    client.send_message(client.find_endpoint("server"), 1, {"tag": tag.decode()}, b"up-" + tag)
    server.send_message(server.find_endpoint(name), 1, None, b"down-" + tag)
    got = scol.wait_for(n_server + 1)[n_server:]
    assert [(m[0], m[3]) for m in got if m[3] == b"up-" + tag] == [(name, b"up-" + tag)]
    got = ccol.wait_for(n_client + 1)[n_client:]
    assert [(m[0], m[3]) for m in got if m[3] == b"down-" + tag] == [("server", b"down-" + tag)]


def port_of(url: str) -> int:
    return parse_url(url)["port"]


def direct_connect(params: dict) -> CommError:
    """One ``connect()`` of a bare driver; returns the CommError it raised."""
    driver = WebSocketDriver()
    driver.validate(params, Mode.ACTIVE)
    try:
        with pytest.raises(CommError) as info:
            driver.connect(ConnectorInfo("CHTEST", driver, params, Mode.ACTIVE))
    finally:
        driver.shutdown()
    return info.value


# -- the happy paths -------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["wss", "https"])
def test_mutual_tls_messages_and_properties(managers, pki, scheme):
    server, url, scol = serve(managers, scheme, pki.server_params())
    assert url.startswith(f"{scheme}://127.0.0.1:")
    client, ccol = client_of(managers, "site-1", url, pki.client_params("site-1"))
    to_server = wait_ready(client, "server", 10)
    to_client = wait_ready(server, "site-1", 10)
    exchange(server, client, scol, ccol, b"1")
    exchange(server, client, scol, ccol, b"2")

    for props, cn in ((to_server.conn_props, "server"), (to_client.conn_props, "site-1")):
        assert props["peer_cn"] == cn
        assert props["tls_version"] in TLS_VERSIONS
        assert props["tls_cipher"]
        assert props["identity_binding"] is True
    assert to_server.conn_props["peer_addr"] == f"127.0.0.1:{port_of(url)}"
    assert to_client.conn_props["peer_addr"] == to_server.conn_props["local_addr"]
    assert to_server.conn_props["tls_cipher"] == to_client.conn_props["tls_cipher"]


def test_server_only_tls_needs_no_client_certificate(managers, pki):
    cert, key = pki.server
    sparams = {"server_cert": cert, "server_key": key, "connection_security": "tls"}
    server, url, scol = serve(managers, "wss", sparams)
    client, ccol = client_of(managers, "site-1", url, {"ca_cert": pki.ca_file, "connection_security": "tls"})
    to_server = wait_ready(client, "server", 10)
    to_client = wait_ready(server, "site-1", 10)
    exchange(server, client, scol, ccol, b"tls")
    assert to_client.conn_props["peer_cn"] is None  # the client presented no certificate
    assert to_client.conn_props["identity_binding"] is False
    assert to_server.conn_props["peer_cn"] == "server"
    assert to_server.conn_props["identity_binding"] is False
    assert to_server.conn_props["tls_version"] in TLS_VERSIONS


def test_server_only_tls_does_not_bind_the_claimed_name(managers, pki):
    """connection_security=tls: a client certificate, if any, is not checked against the name."""
    cert, key = pki.server
    sparams = {"server_cert": cert, "server_key": key, "connection_security": "tls"}
    server, url, scol = serve(managers, "wss", sparams)
    cparams = pki.client_params("site-1", connection_security="tls")
    client, ccol = client_of(managers, "site-7", url, cparams)
    wait_ready(client, "server", 10)
    wait_ready(server, "site-7", 10)
    exchange(server, client, scol, ccol, b"unbound")


def test_secure_true_on_ws_is_tls(managers, pki):
    server, url, scol = serve(managers, "ws", pki.server_params(secure="true"))
    assert url.startswith("wss://127.0.0.1:")  # the reported URL says what peers must use
    client, ccol = client_of(
        managers, "site-1", f"ws://127.0.0.1:{port_of(url)}?secure=true", pki.client_params("site-1")
    )
    to_server = wait_ready(client, "server", 10)
    wait_ready(server, "site-1", 10)
    exchange(server, client, scol, ccol, b"secure")
    assert to_server.conn_props["tls_version"] in TLS_VERSIONS
    assert server.find_endpoint("site-1").conn_props["peer_cn"] == "site-1"


def test_check_hostname(managers, pki):
    """Off by default (as NVFlare's http driver); with check_hostname=true the name must match."""
    wrong_cert, wrong_key = pki.leaf(pki.ca, "server", "elsewhere.example", tag="-elsewhere")
    server, url, scol = serve(
        managers, "wss", {"ca_cert": pki.ca_file, "server_cert": wrong_cert, "server_key": wrong_key}
    )
    port = port_of(url)
    # Default: the certificate's chain is verified, its host names are not.
    client, ccol = client_of(managers, "site-1", url, pki.client_params("site-1"))
    wait_ready(client, "server", 10)
    exchange(server, client, scol, ccol, b"nocheck")

    params = {"scheme": "wss", "host": "127.0.0.1", "port": port, "connect_timeout": scaled(30)}
    e = direct_connect({**params, **pki.client_params("site-2", check_hostname="true")})
    assert e.code == CommError.CLOSED
    assert "TLS handshake" in e.message and "does not verify" in e.message and "mismatch" in e.message

    # A certificate for the name dialled passes the check.
    good_server, good_url, good_scol = serve(managers, "wss", pki.server_params())
    checked, checked_col = client_of(
        managers, "site-3", f"wss://localhost:{port_of(good_url)}", pki.client_params("site-3", check_hostname="true")
    )
    wait_ready(checked, "server", 10)
    exchange(good_server, checked, good_scol, checked_col, b"checked")


# -- refusals, while a good client goes on ----------------------------------------------------


@pytest.fixture
def mtls_pair(managers, pki):
    server, url, scol = serve(managers, "wss", pki.server_params())
    client, ccol = client_of(managers, "site-1", url, pki.client_params("site-1"))
    wait_ready(client, "server", 10)
    wait_ready(server, "site-1", 10)
    exchange(server, client, scol, ccol, b"before")
    return server, client, scol, ccol, url


def _bad_client_params(pki: Pki, case: str) -> dict:
    if case == "other_ca":
        return pki.client_params("site-2", ca=pki.other_ca)
    if case == "expired":
        now = datetime.datetime.now(datetime.UTC)
        cert, key = pki.leaf(
            pki.ca,
            "site-2",
            tag="-expired",
            not_before=now - datetime.timedelta(days=10),
            not_after=now - datetime.timedelta(days=1),
        )
        return {"ca_cert": pki.ca_file, "client_cert": cert, "client_key": key}
    if case == "no_cert":
        return {"ca_cert": pki.ca_file, "connection_security": "tls"}
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "server_says"),
    [
        ("other_ca", "client certificate refused"),
        ("expired", "certificate has expired"),
        ("no_cert", "sent no certificate"),
    ],
)
def test_bad_client_certificate_is_refused_and_others_go_on(managers, pki, mtls_pair, caplog, case, server_says):
    server, client, scol, ccol, url = mtls_pair
    monitor = StateLog()
    with caplog.at_level(logging.INFO):
        bad, _ = client_of(managers, "site-2", url, _bad_client_params(pki, case), monitor)
        wait_until(lambda: server_says in caplog.text, 10, f"server log {server_says!r}")
        # The client says what probably happened (asyncio sends no TLS alert: the reason is
        # only in the listener's log).
        wait_until(lambda: "refuse our client certificate" in caplog.text, 10, "the client's log")
        exchange(server, client, scol, ccol, b"during")
    assert server.find_endpoint("site-2") is None
    assert ("server", EndpointState.READY) not in monitor.events
    bad.stop()
    exchange(server, client, scol, ccol, b"after")
    assert "Traceback" not in caplog.text


def test_certificate_of_another_endpoint_is_refused_before_ready(managers, pki, mtls_pair, caplog):
    """A valid certificate for site-1 used by an endpoint claiming to be site-2."""
    server, client, scol, ccol, url = mtls_pair
    monitor = StateLog()
    with caplog.at_level(logging.INFO):
        impostor, _ = client_of(managers, "site-2", url, pki.client_params("site-1"), monitor)
        wait_until(
            lambda: "refusing" in caplog.text and "'site-2'" in caplog.text and "'site-1'" in caplog.text,
            scaled(10),
            "the identity refusal",
        )
        exchange(server, client, scol, ccol, b"during")
        # It reconnects and is refused again: never READY on either side.
        wait_until(lambda: sum("refusing" in r.getMessage() for r in caplog.records) >= 2, 20, "a second refusal")
    assert server.find_endpoint("site-2") is None
    assert ("server", EndpointState.READY) not in monitor.events
    assert impostor.find_endpoint("server") is None or impostor.find_endpoint("server").state != EndpointState.READY
    assert server.find_endpoint("site-1").state == EndpointState.READY
    exchange(server, client, scol, ccol, b"after")


def test_plaintext_client_to_tls_listener_fails_fast_on_both_ends(pki, mtls_pair, caplog):
    server, client, scol, ccol, url = mtls_pair
    with caplog.at_level(logging.INFO):
        # Generous timeouts: a failure that waited for them would hang the test, not pass it.
        e = direct_connect({"scheme": "ws", "host": "127.0.0.1", "port": port_of(url), "connect_timeout": 3600})
        wait_until(lambda: "plaintext request" in caplog.text, 10, "the listener's warning")
    assert e.code == CommError.CLOSED
    assert "HTTP 400" in e.message and "this listener speaks TLS (wss://)" in e.message
    [record] = [r for r in caplog.records if "plaintext request" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "the client uses ws://?" in record.getMessage()
    exchange(server, client, scol, ccol, b"after")


def test_plaintext_manager_to_tls_listener_is_never_ready(managers, mtls_pair, caplog):
    server, client, scol, ccol, url = mtls_pair
    monitor = StateLog()
    with caplog.at_level(logging.INFO):
        plain, _ = client_of(managers, "site-2", f"ws://127.0.0.1:{port_of(url)}", {}, monitor)
        wait_until(lambda: "this listener speaks TLS" in caplog.text, 10, "the client's log")
    assert monitor.events == [] and server.find_endpoint("site-2") is None
    exchange(server, client, scol, ccol, b"after")


@pytest.mark.parametrize("scheme", ["ws", "http"])
def test_tls_client_to_plaintext_listener_fails_fast_on_both_ends(managers, pki, caplog, scheme):
    server, url, _ = serve(managers, scheme, {})
    secure = {"ws": "wss", "http": "https"}[scheme]
    params = {
        "scheme": secure,
        "host": "127.0.0.1",
        "port": port_of(url),
        "connect_timeout": 3600,
        "tls_handshake_timeout": 3600,
        **pki.client_params("site-1"),
    }
    with caplog.at_level(logging.INFO):
        e = direct_connect(params)
        wait_until(lambda: "TLS ClientHello" in caplog.text, 10, "the listener's warning")
    assert e.code == CommError.CLOSED
    assert "TLS handshake" in e.message and f"plaintext {scheme}:// listener" in e.message
    [record] = [r for r in caplog.records if "TLS ClientHello" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert f"plaintext {scheme} listener: the client uses {secure}://?" in record.getMessage()
    assert "Traceback" not in caplog.text


def test_server_certificate_from_unknown_ca_is_refused_by_client(managers, pki, mtls_pair, caplog):
    server, client, scol, ccol, url = mtls_pair
    params = {"scheme": "wss", "host": "127.0.0.1", "port": port_of(url), "connect_timeout": 3600}
    with caplog.at_level(logging.INFO):
        e = direct_connect({**params, **pki.client_params("site-2", ca_file=pki.other_ca_file)})
        wait_until(lambda: "TLS handshake with" in caplog.text, 10, "the listener's log")
    assert e.code == CommError.CLOSED
    assert "does not verify" in e.message
    exchange(server, client, scol, ccol, b"after")


# -- mistakes at add_connector ---------------------------------------------------------------


def _add(manager: ConnManager, url: str, params: dict, mode: Mode = Mode.PASSIVE) -> CommError:
    with pytest.raises(CommError) as info:
        manager.add_connector(url, params, mode)
    assert info.value.code == CommError.BAD_CONFIG
    return info.value


def test_config_mistakes_are_reported_at_add_connector(managers, pki, tmp_path):
    cm = managers("server")
    cert, key = pki.server
    e = _add(cm, "wss://127.0.0.1:0", {"ca_cert": pki.ca_file, "server_cert": cert})
    assert "server_key" in e.message

    missing = str(tmp_path / "nowhere.crt")
    e = _add(cm, "https://127.0.0.1:0", pki.server_params(server_cert=missing))
    assert "server_cert" in e.message and missing in e.message

    _, other_key = pki.leaf(pki.ca, "server", tag="-other")
    e = _add(cm, "wss://127.0.0.1:0", pki.server_params(server_key=other_key))
    assert "server_cert" in e.message and "server_key" in e.message and other_key in e.message

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    e = _add(cm, "wss://127.0.0.1:0", pki.server_params(ca_cert=str(garbage)))
    assert "ca_cert" in e.message and str(garbage) in e.message

    e = _add(cm, "wss://127.0.0.1:0", pki.server_params(connection_security="loose"))
    assert "connection_security" in e.message

    e = _add(cm, "wss://127.0.0.1:0", pki.server_params(tls_handshake_timeout="soon"))
    assert "tls_handshake_timeout" in e.message

    e = _add(cm, "wss://127.0.0.1:8443", {"ca_cert": pki.ca_file}, Mode.ACTIVE)
    assert "client_cert" in e.message and "client_key" in e.message

    e = _add(cm, "ws://127.0.0.1:8443", {"connect_timeout": "later"}, Mode.ACTIVE)
    assert "connect_timeout" in e.message

    e = _add(cm, "ws://127.0.0.1:0", {"open_timeout": "x"})
    assert "open_timeout" in e.message
    assert cm.connectors == {}


def test_driver_metadata():
    assert {"ws", "http", "wss", "https"} <= set(WebSocketDriver.supported_transports())
    assert WebSocketDriver.capabilities()["tls"] is True


# -- the handshake timeout -------------------------------------------------------------------


SILENT_CASES = {"says_nothing": b"", "half_a_client_hello": b"\x16\x03\x01\x02\x00\x01"}


def _silent_sockets(url: str) -> list[socket.socket]:
    socks = []
    for data in SILENT_CASES.values():
        s = socket.create_connection(("127.0.0.1", port_of(url)), timeout=scaled(10))
        if data:
            s.sendall(data)
        socks.append(s)
    return socks


def test_silent_clients_do_not_block_others(managers, pki):
    """Sockets stuck before or in the TLS handshake (with no timeout to end them) while a
    client connects and exchanges messages; the listener's stop closes them."""
    server, url, scol = serve(managers, "wss", pki.server_params(tls_handshake_timeout=3600))
    socks = _silent_sockets(url)
    try:
        client, ccol = client_of(managers, "site-1", url, pki.client_params("site-1"))
        wait_ready(client, "server", 10)
        wait_ready(server, "site-1", 10)
        exchange(server, client, scol, ccol, b"meanwhile")
        server.stop()
        for s in socks:
            assert closed_by_peer(s, 10)
    finally:
        for s in socks:
            s.close()


def test_handshake_timeout_closes_silent_clients(managers, pki, caplog):
    server, url, scol = serve(managers, "wss", pki.server_params(tls_handshake_timeout=scaled(0.3)))
    with caplog.at_level(logging.INFO):
        socks = _silent_sockets(url)
        try:
            for s in socks:
                assert closed_by_peer(s, 10)
        finally:
            for s in socks:
                s.close()
        wait_until(lambda: "sent nothing within tls_handshake_timeout" in caplog.text, 10, "the log")
        wait_until(lambda: "SSL handshake is taking longer" in caplog.text, 10, "the log")
    client, ccol = client_of(managers, "site-1", url, pki.client_params("site-1"))
    wait_ready(client, "server", 10)
    exchange(server, client, scol, ccol, b"after")


# -- reload_tls ------------------------------------------------------------------------------


def test_reload_tls(managers, pki, tmp_path, caplog):
    """New server certificate files from a new CA: the live connection goes on, new clients
    need the new CA."""
    cert_file, key_file = tmp_path / "server.crt", tmp_path / "server.key"
    old_cert, old_key = pki.server
    cert_file.write_bytes(Path(old_cert).read_bytes())
    key_file.write_bytes(Path(old_key).read_bytes())
    sparams = {"ca_cert": pki.ca_file, "server_cert": str(cert_file), "server_key": str(key_file)}
    server, url, scol = serve(managers, "wss", sparams)
    client, ccol = client_of(managers, "site-1", url, pki.client_params("site-1"))
    wait_ready(client, "server", 10)
    wait_ready(server, "site-1", 10)
    before = server.find_endpoint("site-1").conn_props["peer_addr"]

    new_ca = trustme.CA()
    new_ca_file = pki.write_ca(new_ca, "new-ca")
    new_cert, new_key = pki.leaf(new_ca, "server", "127.0.0.1", tag="-new")
    cert_file.write_bytes(Path(new_cert).read_bytes())
    key_file.write_bytes(Path(new_key).read_bytes())
    server.reload_tls()

    # The live connection goes on, on the same socket.
    exchange(server, client, scol, ccol, b"after-reload")
    assert server.find_endpoint("site-1").conn_props["peer_addr"] == before

    # A client trusting only the new CA connects (its own certificate is still from the
    # CA the listener trusts for clients).
    new_client, new_col = client_of(managers, "site-2", url, pki.client_params("site-2", ca_file=new_ca_file))
    wait_ready(new_client, "server", 10)
    wait_ready(server, "site-2", 10)
    exchange(server, new_client, scol, new_col, b"new-ca")
    assert new_client.find_endpoint("server").conn_props["peer_cn"] == "server"

    # One trusting only the old CA is refused by its own check of the server certificate.
    params = {"scheme": "wss", "host": "127.0.0.1", "port": port_of(url), "connect_timeout": 3600}
    e = direct_connect({**params, **pki.client_params("site-3")})
    assert e.code == CommError.CLOSED and "does not verify" in e.message

    # Files that do not fit are refused by reload_tls, and the settings in use stay.
    key_file.write_bytes(Path(old_key).read_bytes())
    with pytest.raises(CommError) as info:
        server.reload_tls()
    assert info.value.code == CommError.BAD_CONFIG and "server_key" in info.value.message
    newest, newest_col = client_of(managers, "site-4", url, pki.client_params("site-4", ca_file=new_ca_file))
    wait_ready(server, "site-4", 10)
    wait_ready(newest, "server", 10)
    exchange(server, newest, scol, newest_col, b"kept")
    exchange(server, client, scol, ccol, b"still")


def test_concurrent_tls_clients(managers, pki):
    server, url, scol = serve(managers, "wss", pki.server_params())
    clients = []
    threads = []

    def start(i: int) -> None:
        clients.append(client_of(managers, f"site-{i}", url, pki.client_params(f"site-{i}")))

    for i in range(1, 9):
        threads.append(threading.Thread(target=start, args=(i,)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(1, 9):
        wait_ready(server, f"site-{i}", 20)
    for client, col in clients:
        wait_ready(client, "server", 10)
        exchange(server, client, scol, col, client.local_endpoint.name.encode())


def test_big_messages_and_order_over_tls(managers, pki):
    server, url, scol = serve(managers, "https", pki.server_params())
    client, ccol = client_of(managers, "site-1", url, pki.client_params("site-1"))
    wait_ready(client, "server", 10)
    big = bytes(range(256)) * (24 * 1024 + 7)  # about 6 MiB, not a multiple of a TLS record
    client.send_message(client.find_endpoint("server"), 1, None, [memoryview(big), bytearray(b"tail")])
    for i in range(200):
        client.send_message(client.find_endpoint("server"), 1, {"i": i}, b"x" * (i * 37))
    server.send_message(server.find_endpoint("site-1"), 1, None, big)
    got = scol.wait_for(201, 30)
    assert got[0][3] == big + b"tail"
    assert [m[2]["i"] for m in got[1:]] == list(range(200))
    assert all(m[3] == b"x" * (m[2]["i"] * 37) or (m[3] is None and m[2]["i"] == 0) for m in got[1:])
    assert ccol.wait_for(1, 30)[0][3] == big
