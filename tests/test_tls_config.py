"""The core's TLS settings and identity binding, without a connection: what every driver uses."""

from __future__ import annotations

import ssl

import pytest
import trustme

from sfm_core import CommError
from sfm_core.identity import check_identity, resolve_identity
from sfm_core.tls import IDENTITY_BINDING, PEER_CN, TlsSettings, common_name


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate and a site certificate as PEM files."""
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    for name in ("server", "site-1"):
        cert = ca.issue_cert("localhost", "127.0.0.1", common_name=name)
        cert.cert_chain_pems[0].write_to_path(str(d / f"{name}.crt"))
        cert.private_key_pem.write_to_path(str(d / f"{name}.key"))
    return d


def server_params(d, **kw) -> dict:
    return {
        "scheme": "stcp",
        "ca_cert": str(d / "ca.pem"),
        "server_cert": str(d / "server.crt"),
        "server_key": str(d / "server.key"),
        **kw,
    }


def client_params(d, **kw) -> dict:
    return {
        "scheme": "stcp",
        "ca_cert": str(d / "ca.pem"),
        "client_cert": str(d / "site-1.crt"),
        "client_key": str(d / "site-1.key"),
        **kw,
    }


def test_plain_schemes_have_no_tls_and_secure_turns_it_on(pki) -> None:
    """tcp:// is plain; stcp:// and tcp:// with secure=true are TLS."""
    assert TlsSettings.from_params({"scheme": "tcp"}, server=True, driver="tcp") is None
    on = TlsSettings.from_params({**server_params(pki), "scheme": "tcp", "secure": "true"}, server=True, driver="tcp")
    assert on is not None and on.security == "mtls"


def test_mtls_contexts_require_tls12_and_client_certificates(pki) -> None:
    """The server asks for a client certificate on mtls, not on tls; both refuse below TLS 1.2."""
    server = TlsSettings.from_params(server_params(pki), server=True, driver="tcp")
    ctx = server.server_context()
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2 and ctx.verify_mode == ssl.CERT_REQUIRED
    assert server.binds_identity
    only = TlsSettings.from_params(server_params(pki, connection_security="tls"), server=True, driver="tcp")
    assert only.server_context().verify_mode == ssl.CERT_NONE and not only.binds_identity
    client = TlsSettings.from_params(client_params(pki), server=False, driver="tcp").client_context()
    assert client.verify_mode == ssl.CERT_REQUIRED and not client.check_hostname  # NVFlare's tcp policy


def test_clear_on_a_secure_scheme_is_mutual_tls_without_identity_binding(pki) -> None:
    """As in NVFlare: connection_security=clear on stcp still runs mutual TLS, binding off."""
    s = TlsSettings.from_params(server_params(pki, connection_security="clear"), server=True, driver="tcp")
    assert s.mutual and not s.binds_identity


@pytest.mark.parametrize(
    ("params", "server", "expected"),
    [
        ({"scheme": "stcp"}, True, "needs ca_cert, server_cert, server_key; missing: ca_cert, server_cert, server_key"),
        ({"scheme": "stcp", "ca_cert": "x"}, False, "missing: client_cert, client_key"),
        ({"scheme": "stcp", "connection_security": "tls"}, False, "needs ca_cert; missing: ca_cert"),
        ({"scheme": "stcp", "connection_security": "maybe"}, True, "connection_security='maybe' is not one of"),
    ],
)
def test_missing_files_and_bad_modes_are_named(params: dict, server: bool, expected: str) -> None:
    """A secure connector without the files it needs says which."""
    with pytest.raises(CommError, match=expected.replace("(", r"\(")) as err:
        TlsSettings.from_params(params, server=server, driver="tcp")
    assert err.value.code == CommError.BAD_CONFIG


def test_unreadable_and_mismatched_files_are_named(pki, tmp_path) -> None:
    """An unreadable file is named with its parameter; a key that is not the certificate's says so."""
    with pytest.raises(CommError, match=r"server_key='/nonexistent/k.pem' cannot be read"):
        TlsSettings.from_params(server_params(pki, server_key="/nonexistent/k.pem"), server=True, driver="tcp")
    with pytest.raises(CommError, match="do not make a certificate and its key"):
        TlsSettings.from_params(server_params(pki, server_key=str(pki / "site-1.key")), server=True, driver="tcp")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(CommError, match="ca_cert=.*is not a PEM CA certificate"):
        TlsSettings.from_params(server_params(pki, ca_cert=str(junk)), server=True, driver="tcp")


def test_reload_keeps_the_old_context_when_the_new_files_are_wrong(pki, tmp_path) -> None:
    """reload() builds a new context from the files; a broken file raises and changes nothing."""
    key = tmp_path / "server.key"
    key.write_bytes((pki / "server.key").read_bytes())
    s = TlsSettings.from_params(server_params(pki, server_key=str(key)), server=True, driver="tcp")
    before = s.server_context()
    s.reload()
    assert s.server_context() is not before
    kept = s.server_context()
    key.write_text("garbage")
    with pytest.raises(CommError, match="do not make a certificate and its key"):
        s.reload()
    assert s.server_context() is kept


def test_common_name_of_a_peer_certificate() -> None:
    """The CN comes out of getpeercert()'s subject; none gives None."""
    cert = {"subject": ((("countryName", "US"),), (("commonName", "site-1"),))}
    assert common_name(cert) == "site-1" and common_name({}) is None
    assert PEER_CN == "peer_cn" and IDENTITY_BINDING == "identity_binding"


@pytest.mark.parametrize(
    ("claimed", "local", "explicit", "identity"),
    [
        ("site-1", "server", None, "site-1"),
        ("site-1.job_7", "server", None, "site-1"),
        ("server.drv", "server", None, "drv"),  # a child of the local endpoint: its leaf
        ("site-1.-client_api_42", "server", None, "site-1"),
        ("server.drv.-client_api_1", "server", None, "drv"),
        ("_admin_1234", "server", None, None),  # exempt
        ("relay-9.x", "server", {"relay-": "relays"}, "relays"),
        ("relay-9.x", "server", {"relay-": "relays", "relay-9": "r9"}, "r9"),  # longest prefix
    ],
)
def test_identity_resolution(claimed: str, local: str, explicit, identity) -> None:
    """NVFlare 2.9's rule, in its order, plus the explicit map."""
    assert resolve_identity(claimed, local, explicit) == identity


def test_identity_check_is_exact_and_refuses_a_missing_cn() -> None:
    """Exact and case-sensitive; a certificate without a CN is refused; an exempt name passes."""
    assert check_identity("site-1.job", "site-1", "server") is None
    assert "certificate is for 'Site-1'" in check_identity("site-1", "Site-1", "server")
    assert "has no common name" in check_identity("site-1", None, "server")
    assert check_identity("_admin_x", None, "server") is None


def test_tls_files_on_a_plain_scheme_are_warned_about(pki, caplog) -> None:
    """tcp:// with certificate params is plain TCP: said at add_connector, not silently."""
    from sfm_core import ConnManager, Endpoint, Mode

    m = ConnManager(Endpoint("server"))
    try:
        m.add_connector("tcp://127.0.0.1:0", server_params(pki, scheme="tcp"), Mode.PASSIVE)
    finally:
        m.stop(linger=0)
    assert "ignored, the connection is plain" in caplog.text and "server_cert" in caplog.text


def test_serve_refuses_tls_options_next_to_a_config_file(tmp_path) -> None:
    """sfm serve --config with --ca-cert: exit 2 with what to do, not silently ignored."""
    from sfm_core.cli import main

    cfg = tmp_path / "site.toml"
    cfg.write_text('[endpoint]\nname = "server"\n')
    assert main(["serve", "--config", str(cfg), "--ca-cert", "ca.pem"]) == 2
