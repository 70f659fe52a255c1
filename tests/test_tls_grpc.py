"""TLS on the gRPC driver (grpcs://, secure=true) over real loopback ConnManagers, and the
listener's bounds on connections that never open a stream.

Certificates come from trustme: one CA for the deployment, a server certificate with SANs
localhost and 127.0.0.1 (gRPC checks the SAN against the dialled host) and CN "server", and
client certificates whose CN is the client endpoint's name, as NVFlare provisions them.
"""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
from pathlib import Path

import pytest
from helpers import Collector, StateLog, closed_by_peer, scaled, wait_ready, wait_until

from sfm_core import CommError, ConnManager, Endpoint, EndpointState, Mode
from sfm_core.url import parse_url

trustme = pytest.importorskip("trustme")
GrpcDriver = pytest.importorskip("sfm_driver_grpc").GrpcDriver

#: The client's HTTP/2 connection preface and an empty SETTINGS frame.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


# -- certificates ----------------------------------------------------------------------------


class Pki:
    """PEM files in a directory: two CAs and the certificates they issue."""

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

    def leaf(self, ca, cn: str, *identities: str, tag: str = "") -> tuple[str, str]:
        """(cert file, key file) of a certificate with common name ``cn`` issued by ``ca``."""
        cert = ca.issue_cert(*(identities or (cn,)), common_name=cn)
        stem = self.root / f"{cn}{tag}"
        cert.cert_chain_pems[0].write_to_path(f"{stem}.crt")
        cert.private_key_pem.write_to_path(f"{stem}.key")
        return f"{stem}.crt", f"{stem}.key"

    def server_params(self, **extra) -> dict:
        cert, key = self.server
        return {"ca_cert": self.ca_file, "server_cert": cert, "server_key": key, **extra}

    def client_params(self, cn: str = "site-1", ca=None, **extra) -> dict:
        cert, key = self.leaf(ca or self.ca, cn, tag="-other" if ca is self.other_ca else "")
        return {"ca_cert": self.ca_file, "client_cert": cert, "client_key": key, **extra}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


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


def listen(cm: ConnManager, url: str, params: dict) -> str:
    h = cm.add_connector(url, params, Mode.PASSIVE)
    cm.start()
    return cm.wait_listening(h, scaled(10))


def client_of(managers, name: str, url: str, params: dict, **kwargs) -> tuple[ConnManager, Collector]:
    cm = managers(name, **kwargs)
    rx = Collector()
    cm.register_message_receiver(1, rx)
    cm.add_connector(url, params, Mode.ACTIVE)
    cm.start()
    return cm, rx


def exchange(client: ConnManager, crx: Collector, server: ConnManager, srx: Collector, name: str, tag: str) -> None:
    """One message each way between ``client`` (endpoint ``name``) and ``server``."""
    to_server = wait_ready(client, "server", timeout=10)
    to_client = wait_ready(server, name, timeout=10)
    n_s, n_c = len(srx.messages), len(crx.messages)
    client.send_message(to_server, 1, {"tag": tag}, b"up")
    server.send_message(to_client, 1, {"tag": tag}, b"down")
    assert srx.wait_for(n_s + 1)[n_s][:4] == (name, 1, {"tag": tag}, b"up")
    assert crx.wait_for(n_c + 1)[n_c][:4] == ("server", 1, {"tag": tag}, b"down")


def _logged(caplog, text: str):
    return lambda: [r for r in list(caplog.records) if text in r.getMessage()]


# -- working TLS -----------------------------------------------------------------------------


def test_grpcs_mutual_tls_both_ways(pki, managers):
    server = managers("server")
    srx = Collector()
    server.register_message_receiver(1, srx)
    url = listen(server, "grpcs://127.0.0.1:0", pki.server_params())
    assert url.startswith("grpcs://127.0.0.1:")
    client, crx = client_of(managers, "site-1", url, pki.client_params("site-1"))
    exchange(client, crx, server, srx, "site-1", "mtls")
    big = bytes(range(256)) * 8192  # 2 MiB
    server.send_message(server.find_endpoint("site-1"), 1, {"big": 1}, big)
    assert crx.wait_for(2, timeout=20)[1][3] == big

    props = server.find_endpoint("site-1").conn_props
    assert props["peer_cn"] == "site-1"
    assert props["identity_binding"] is True
    assert props["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert props["transport"] == "grpcs"
    assert "tls_cipher" in props  # gRPC does not tell the cipher: None
    # gRPC tells a client nothing of the server's certificate (it checked the SAN itself).
    cprops = client.find_endpoint("server").conn_props
    assert cprops["peer_cn"] is None and cprops["identity_binding"] is False
    assert cprops["transport"] == "grpcs"


def test_server_only_tls_needs_no_client_certificate(pki, managers):
    server = managers("server")
    srx = Collector()
    server.register_message_receiver(1, srx)
    cert, key = pki.server
    url = listen(server, "grpcs://127.0.0.1:0", {"server_cert": cert, "server_key": key, "connection_security": "tls"})
    client, crx = client_of(managers, "site-1", url, {"ca_cert": pki.ca_file, "connection_security": "tls"})
    exchange(client, crx, server, srx, "site-1", "tls")
    props = server.find_endpoint("site-1").conn_props
    assert props["peer_cn"] is None and props["identity_binding"] is False


def test_secure_true_on_grpc_and_clear_mode(pki, managers):
    """``secure=true`` on grpc:// is TLS (reported as grpcs://); ``connection_security=clear``
    is mutual TLS without identity binding, as in NVFlare."""
    server = managers("server")
    srx = Collector()
    server.register_message_receiver(1, srx)
    url = listen(server, "grpc://127.0.0.1:0", pki.server_params(secure="true", connection_security="clear"))
    assert url.startswith("grpcs://")
    # Its certificate says site-2, it claims site-1: no binding, so admitted.
    client, crx = client_of(managers, "site-1", url, pki.client_params("site-2", connection_security="clear"))
    exchange(client, crx, server, srx, "site-1", "clear")
    props = server.find_endpoint("site-1").conn_props
    assert props["peer_cn"] == "site-2" and props["identity_binding"] is False


def test_ssl_target_name_override(tmp_path, pki, managers, caplog):
    """gRPC checks the server certificate's SANs against the dialled host; a certificate that
    does not name it is refused, unless ssl_target_name_override names what it has."""
    caplog.set_level(logging.WARNING, logger="sfm_driver_grpc")
    cert, key = pki.leaf(pki.ca, "server", "grpc.example.org", tag="-named")
    server = managers("server")
    srx = Collector()
    server.register_message_receiver(1, srx)
    url = listen(server, "grpcs://127.0.0.1:0", {"ca_cert": pki.ca_file, "server_cert": cert, "server_key": key})

    states = StateLog()
    wrong, _ = client_of(managers, "site-2", url, pki.client_params("site-2", connect_timeout=600))
    wrong.add_endpoint_monitor(states)
    wait_until(_logged(caplog, "does not name '127.0.0.1'"), 10, "the hostname check failing")
    wrong.stop()
    assert states.events == []

    client, crx = client_of(
        managers, "site-1", url, pki.client_params("site-1", ssl_target_name_override="grpc.example.org")
    )
    exchange(client, crx, server, srx, "site-1", "override")


# -- refusals while a good client is served --------------------------------------------------


def test_refused_clients_while_a_good_one_is_served(pki, managers, caplog):
    caplog.set_level(logging.WARNING, logger="sfm_driver_grpc")
    caplog.set_level(logging.WARNING, logger="sfm_core")
    server = managers("server")
    srx = Collector()
    server.register_message_receiver(1, srx)
    tls = server.add_connector("grpcs://127.0.0.1:0", pki.server_params(), Mode.PASSIVE)
    plain = server.add_connector("grpc://127.0.0.1:0", {}, Mode.PASSIVE)
    server.start()
    url, plain_url = server.wait_listening(tls, scaled(10)), server.wait_listening(plain, scaled(10))
    client, crx = client_of(managers, "site-1", url, pki.client_params("site-1"))
    exchange(client, crx, server, srx, "site-1", "before")
    [good] = server.get_connections("site-1")
    server_states = StateLog()
    server.add_endpoint_monitor(server_states)

    port = parse_url(url)["port"]
    no_cert = {"ca_cert": pki.ca_file, "connection_security": "tls"}
    # connect_timeout far beyond any wait here: each refusal must come at once, not by timeout.
    slow = {"connect_timeout": 600}
    refused = [
        # (what, claimed name, URL, params, a log line that says why)
        ("client cert from another CA", "site-1", url, pki.client_params("site-1", ca=pki.other_ca), "TLS handshake"),
        ("no client cert on mtls", "site-1", url, no_cert, "TLS handshake"),
        ("plaintext grpc to grpcs", "site-1", f"grpc://127.0.0.1:{port}", {}, "connect with grpcs://"),
        (
            "grpcs to plaintext grpc",
            "site-1",
            plain_url.replace("grpc://", "grpcs://"),
            pki.client_params(),
            "does not speak TLS",
        ),
        (
            "CN not matching the claimed name",
            "site-3",
            url,
            pki.client_params("site-2"),
            "peer claims endpoint 'site-3' (identity 'site-3') but its certificate is for 'site-2'",
        ),
    ]
    for what, name, target, params, text in refused:
        caplog.clear()
        states = StateLog()
        bad = managers(name)
        bad.add_endpoint_monitor(states)
        bad.add_connector(target, {**params, **slow}, Mode.ACTIVE)
        bad.start()
        try:
            records = wait_until(_logged(caplog, text), 10, f"{what}: a log line with {text!r}")
            if name == "site-1":
                assert "grpc" in records[0].name, what
        finally:
            bad.stop()
        assert states.events == [], f"{what}: {states.events}"
        assert server.find_endpoint("site-3") is None, what
        assert server_states.events == [], f"{what}: {server_states.events}"
        assert server.get_connections("site-1") == [good], f"{what}: the good connection was replaced"
        exchange(client, crx, server, srx, "site-1", what)

    # What the client logged says what is wrong, in words.
    plain_to_tls = _plain_to_tls_message(managers, caplog, port)
    assert "TLS listener (grpcs://)" in plain_to_tls


def _plain_to_tls_message(managers, caplog, port: int) -> str:
    caplog.clear()
    bad = managers("site-9")
    bad.add_connector(f"grpc://127.0.0.1:{port}", {"connect_timeout": 600}, Mode.ACTIVE)
    bad.start()
    try:
        [record] = wait_until(_logged(caplog, "cannot connect"), 10, "the plaintext client's warning")[:1]
    finally:
        bad.stop()
    assert record.levelno == logging.WARNING
    return record.getMessage()


def test_tls_client_to_plaintext_listener_says_so(pki, managers, caplog):
    caplog.set_level(logging.WARNING, logger="sfm_driver_grpc")
    server = managers("server")
    url = listen(server, "grpc://127.0.0.1:0", {})
    states = StateLog()
    bad, _ = client_of(managers, "site-1", url.replace("grpc://", "grpcs://"), pki.client_params(connect_timeout=600))
    bad.add_endpoint_monitor(states)
    [record] = wait_until(_logged(caplog, "cannot connect"), 10, "the TLS client's warning")[:1]
    assert "does not speak TLS: it is likely a plaintext grpc:// listener" in record.getMessage()
    bad.stop()
    assert states.events == [] and server.find_endpoint("site-1") is None


# -- mistakes reported by add_connector ------------------------------------------------------


@pytest.mark.parametrize("mode", [Mode.PASSIVE, Mode.ACTIVE])
def test_missing_file_parameter_is_named(pki, managers, mode):
    cm = managers("x")
    params = pki.server_params() if mode == Mode.PASSIVE else pki.client_params()
    dropped = "server_key" if mode == Mode.PASSIVE else "client_cert"
    del params[dropped]
    with pytest.raises(CommError, match=f"missing: {dropped}") as e:
        cm.add_connector("grpcs://127.0.0.1:0" if mode == Mode.PASSIVE else "grpcs://127.0.0.1:1", params, mode)
    assert e.value.code == CommError.BAD_CONFIG
    assert cm.connectors == {}


@pytest.mark.parametrize("mode", [Mode.PASSIVE, Mode.ACTIVE])
def test_unreadable_file_is_named(tmp_path, pki, managers, mode):
    cm = managers("x")
    missing = str(tmp_path / "nowhere" / "ca.pem")
    params = pki.server_params() if mode == Mode.PASSIVE else pki.client_params()
    params["ca_cert"] = missing
    with pytest.raises(CommError, match="ca_cert=.*nowhere/ca.pem.* cannot be read") as e:
        cm.add_connector("grpcs://127.0.0.1:0" if mode == Mode.PASSIVE else "grpcs://127.0.0.1:1", params, mode)
    assert e.value.code == CommError.BAD_CONFIG


@pytest.mark.parametrize("mode", [Mode.PASSIVE, Mode.ACTIVE])
def test_key_not_matching_certificate(pki, managers, mode):
    cm = managers("x")
    _, other_key = pki.leaf(pki.ca, "someone-else")
    if mode == Mode.PASSIVE:
        params, key = pki.server_params(), "server_key"
    else:
        params, key = pki.client_params(), "client_key"
    params[key] = other_key
    with pytest.raises(CommError, match=f"{key}=.*someone-else.key.* do not make a certificate and its key") as e:
        cm.add_connector("grpcs://127.0.0.1:0" if mode == Mode.PASSIVE else "grpcs://127.0.0.1:1", params, mode)
    assert e.value.code == CommError.BAD_CONFIG


def test_bad_driver_parameters_are_named(pki, managers):
    cm = managers("x")
    with pytest.raises(CommError, match="idle_timeout='soon'"):
        cm.add_connector("grpc://127.0.0.1:0?idle_timeout=soon", {}, Mode.PASSIVE)
    with pytest.raises(CommError, match="handshake_timeout"):
        cm.add_connector("grpcs://127.0.0.1:0", pki.server_params(handshake_timeout=0), Mode.PASSIVE)
    with pytest.raises(CommError, match="connect_timeout"):
        cm.add_connector("grpc://127.0.0.1:1?connect_timeout=x", {}, Mode.ACTIVE)
    assert "grpcs" in GrpcDriver.supported_transports() and GrpcDriver.capabilities()["tls"] is True


# -- reload ----------------------------------------------------------------------------------


def test_reload_tls_on_the_listener(tmp_path, pki, managers, caplog):
    """New files (another CA) are used by new connections after reload_tls; the live
    connection goes on; files that do not fit are refused and the previous ones kept."""
    caplog.set_level(logging.WARNING, logger="sfm_driver_grpc")
    live = tmp_path / "live"
    live.mkdir()
    cert, key = pki.server
    shutil.copy(pki.ca_file, live / "ca.pem")
    shutil.copy(cert, live / "server.crt")
    shutil.copy(key, live / "server.key")
    params = {
        "ca_cert": str(live / "ca.pem"),
        "server_cert": str(live / "server.crt"),
        "server_key": str(live / "server.key"),
    }
    server = managers("server")
    srx = Collector()
    server.register_message_receiver(1, srx)
    url = listen(server, "grpcs://127.0.0.1:0", params)
    old, orx = client_of(managers, "site-1", url, pki.client_params("site-1"))
    exchange(old, orx, server, srx, "site-1", "before reload")
    [old_conn] = server.get_connections("site-1")

    # A new deployment CA: the server's new certificate and the CA it trusts for clients.
    new_ca = trustme.CA()
    new_ca.cert_pem.write_to_path(str(live / "ca.pem"))
    new_cert = new_ca.issue_cert("localhost", "127.0.0.1", common_name="server")
    new_cert.cert_chain_pems[0].write_to_path(str(live / "server.crt"))
    new_cert.private_key_pem.write_to_path(str(live / "server.key"))
    server.reload_tls()

    new_ca_file = tmp_path / "new-ca.pem"
    new_ca.cert_pem.write_to_path(str(new_ca_file))
    leaf = new_ca.issue_cert("site-2", common_name="site-2")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "site-2.crt"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "site-2.key"))
    new_params = {
        "ca_cert": str(new_ca_file),
        "client_cert": str(tmp_path / "site-2.crt"),
        "client_key": str(tmp_path / "site-2.key"),
    }
    new, nrx = client_of(managers, "site-2", url, new_params)
    exchange(new, nrx, server, srx, "site-2", "after reload")
    assert server.find_endpoint("site-2").conn_props["peer_cn"] == "site-2"
    # The connection made before the reload goes on.
    assert server.get_connections("site-1") == [old_conn]
    exchange(old, orx, server, srx, "site-1", "old after reload")

    # A new client of the old CA is refused now (it does not trust the new server certificate).
    caplog.clear()
    states = StateLog()
    stale, _ = client_of(managers, "site-3", url, pki.client_params("site-3", connect_timeout=600))
    stale.add_endpoint_monitor(states)
    wait_until(_logged(caplog, "is not trusted by ca_cert"), 10, "the old-CA client refused")
    stale.stop()
    assert states.events == []

    # Files that do not fit: reload_tls says so and the listener keeps what it has.
    _, wrong_key = pki.leaf(pki.ca, "not-the-key")
    shutil.copy(wrong_key, live / "server.key")
    with pytest.raises(CommError, match="server_key=.*server.key.* do not make a certificate and its key") as e:
        server.reload_tls()
    assert e.value.code == CommError.BAD_CONFIG
    new.stop()
    third, trx = client_of(managers, "site-2", url, new_params)
    exchange(third, trx, server, srx, "site-2", "after a refused reload")


# -- hostile peers: connections that never open a stream -------------------------------------


def _raw(port: int, client: dict | None) -> socket.socket:
    """A TCP connection to ``port``; with ``client`` (TLS params), a TLS one with that
    client certificate (accepted by the listener) and ALPN h2, as a gRPC client makes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=scaled(5))
    if client is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(client["ca_cert"])
        ctx.load_cert_chain(client["client_cert"], client["client_key"])
        ctx.set_alpn_protocols(["h2"])
        sock = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
    return sock


@pytest.mark.parametrize("scheme", ["grpc", "grpcs"])
def test_connections_without_a_stream_are_closed(scheme, pki, managers):
    """A listener closes, within its handshake_timeout, a TCP connection that sends nothing
    (on grpcs: nor finishes TLS), and, within its idle_timeout, one that speaks HTTP/2 but
    opens no stream; a good client's stream is served throughout."""
    bound = scaled(1.0)
    params = {"handshake_timeout": bound, "idle_timeout": bound}
    if scheme == "grpcs":
        params.update(pki.server_params())
    server = managers("server")
    srx = Collector()
    server.register_message_receiver(1, srx)
    url = listen(server, f"{scheme}://127.0.0.1:0", params)
    port = parse_url(url)["port"]
    tls = pki.client_params("site-1") if scheme == "grpcs" else None
    client, crx = client_of(managers, "site-1", url, tls or {})
    exchange(client, crx, server, srx, "site-1", "before")
    [good] = server.get_connections("site-1")

    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    h2 = []
    try:
        if tls is not None:
            silent.append(_raw(port, tls))  # TLS done, then nothing: no HTTP/2 preface
        for _ in range(3):
            sock = _raw(port, tls)
            sock.sendall(H2_PREFACE)
            h2.append(sock)
        for sock in silent:
            assert closed_by_peer(sock, timeout=10), "a silent connection was kept"
        for sock in h2:
            assert closed_by_peer(sock, timeout=10), "an HTTP/2 connection without a stream was kept"
    finally:
        for sock in silent + h2:
            sock.close()
    # The good client's stream is not idle: it goes on, past both bounds.
    assert server.get_connections("site-1") == [good]
    exchange(client, crx, server, srx, "site-1", "after")
    assert server.find_endpoint("site-1").state == EndpointState.READY
