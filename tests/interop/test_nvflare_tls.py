"""sfm over TLS against a real NVFlare 2.9.0 endpoint: mutual TLS on ``stcp``, ``grpcs`` and
``https``, both directions, and what each listener refuses while a good client is served.

Certificates are made per test with trustme (``tls_support.Pki``): one CA, a server
certificate with SANs 127.0.0.1 and localhost and CN = the server's endpoint name, client
certificates with CN = the client's endpoint name. NVFlare gets the PEM paths as connector
resources under the names sfm uses too (``ca_cert``, ``server_cert``, ``server_key``,
``client_cert``, ``client_key``, ``connection_security``).

Refused connections go through a ``tls_support.Relay``, which records who ended each
connection, so a refusal is seen whatever the refusing side logs. What NVFlare does in each
case is in ``FINDINGS.md`` ("TLS").
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from urllib.parse import urlsplit

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/helpers.py
from helpers import Collector, StateLog, scaled, wait_ready, wait_until
from tls_support import CLIENT, SERVER, Pki, Relay

from sfm_core import ConnManager, Endpoint, EndpointState, Mode

#: Secure scheme -> the plain scheme of the same driver.
PLAIN = {"stcp": "tcp", "grpcs": "grpc", "https": "http"}
SCHEMES = list(PLAIN)
MIB = 1024 * 1024
HEADERS = {"s": "text é", "i": 42, "neg": -7, "b": b"\x00\x01\xff", "l": [1, "two", b"\x03"], "d": {"k": "v", "n": 1}}
# Below the 4 MiB an NVFlare http client accepts (FINDINGS.md), so one size serves every case.
BIG = 3 * MIB


@pytest.fixture
def pki(tmp_path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def managers():
    """``make(name, **kwargs) -> ConnManager`` (properties ``{"impl": "sfm"}``); all stopped at teardown."""
    made: list[ConnManager] = []

    def make(name: str, **kwargs) -> ConnManager:
        m = ConnManager(Endpoint(name, {"impl": "sfm"}), **kwargs)
        made.append(m)
        return m

    yield make
    for m in reversed(made):
        m.stop()


def _port(url: str) -> int:
    return urlsplit(url).port


def _logged(caplog, text: str):
    """A predicate for wait_until: a captured log record containing ``text``."""
    return lambda: [r for r in list(caplog.records) if text in r.getMessage()]


def _exchange(ours: ConnManager, rx: Collector, nv, our_name: str, their_name: str) -> None:
    """Handshake properties, then DATA both ways: mixed headers, a small, an empty, a None
    and a 3 MiB payload."""
    ep = wait_ready(ours, their_name, timeout=20)
    nv.wait_for_state(our_name, "READY", timeout=20)
    assert ep.properties["impl"] == "nvflare"
    assert nv.find_endpoint(our_name)["properties"]["impl"] == "sfm"

    big = os.urandom(BIG)
    for kind, payload in [("small", b"hello nvflare"), ("empty", b""), ("none", None), ("big", big)]:
        ours.send_message(ep, 1, {**HEADERS, "kind": kind}, payload)
    got = {m.headers["kind"]: m for m in nv.wait_for_messages(4, timeout=30)}
    assert all(m.sender == our_name and m.app_id == 1 for m in got.values())
    assert {k: v for k, v in got["small"].headers.items() if k != "kind"} == HEADERS
    assert got["small"].payload == b"hello nvflare"
    assert got["empty"].payload is None and got["none"].payload is None  # NVFlare delivers both as None
    assert got["big"].payload_sha256 == hashlib.sha256(big).hexdigest()

    before = len(rx.messages)
    big = os.urandom(BIG)
    for kind, payload in [("small", b"hello sfm"), ("empty", b""), ("none", None), ("big", big)]:
        nv.send(our_name, 1, {**HEADERS, "kind": kind}, payload, timeout=60)
    msgs = {m[2]["kind"]: m for m in rx.wait_for(before + 4, timeout=30)[before:]}
    assert msgs["small"][:4] == (their_name, 1, {**HEADERS, "kind": "small"}, b"hello sfm")
    assert msgs["empty"][3] is None and msgs["none"][3] is None
    assert msgs["big"][3] == big


def _still_served(ours: ConnManager, rx: Collector, nv, our_name: str, their_name: str, good, tag: str) -> None:
    """The good client's connection is the one it was, and a message goes each way on it."""
    assert ours.get_connections(their_name) == [good], f"after {tag}: the good connection was replaced or lost"
    ep = ours.find_endpoint(their_name)
    assert ep.state == EndpointState.READY
    ours.send_message(ep, 1, {"after": tag}, b"to nvflare")
    [m] = nv.wait_for_messages(1)
    assert (m.sender, m.headers, m.payload) == (our_name, {"after": tag}, b"to nvflare")
    before = len(rx.messages)
    nv.send(our_name, 1, {"after": tag}, b"to sfm")
    assert rx.wait_for(before + 1)[before][:4] == (their_name, 1, {"after": tag}, b"to sfm")


# ---- the harness itself: NVFlare to NVFlare over mutual TLS ------------------------------


def test_nvflare_to_nvflare_over_mtls(nvflare_peer_factory, pki) -> None:
    """The harness passes TLS resources through: two NVFlare endpoints talk over each secure
    scheme in turn (one connection per endpoint pair at a time), and each side reports the
    peer's certificate CN where NVFlare's driver gives it."""
    server = nvflare_peer_factory("server", app_ids=[1], properties={"impl": "nvflare"})
    client = nvflare_peer_factory("site-1", app_ids=[1], properties={"impl": "nvflare"})
    urls = {s: server.listen(s, resources=pki.server("server")) for s in SCHEMES}
    server.start()
    client.start()
    for scheme, url in urls.items():
        since_s, since_c = len(server.events), len(client.events)
        handle = client.add_connector(url, "active", resources=pki.client("site-1"))
        server.wait_for_state("site-1", "READY", since=since_s)
        client.wait_for_state("server", "READY", since=since_c)
        assert server.find_endpoint("site-1")["conn_props"]["peer_cn"] == "site-1"
        # NVFlare's gRPC client does not know the server's CN (so it checks no identity).
        expected = None if scheme == "grpcs" else "server"
        assert client.find_endpoint("server")["conn_props"].get("peer_cn") == expected
        client.send("server", 1, {"scheme": scheme}, b"up")
        server.send("site-1", 1, {"scheme": scheme}, b"down")
        [up] = server.wait_for_messages(1)
        [down] = client.wait_for_messages(1)
        assert (up.headers, up.payload) == ({"scheme": scheme}, b"up")
        assert (down.headers, down.payload) == ({"scheme": scheme}, b"down")
        since_s = len(server.events)
        client.remove_connector(handle)
        server.wait_for_state("site-1", "DISCONNECTED", since=since_s)


# ---- NVFlare connects to our listener ------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_nvflare_client_and_our_tls_listener(scheme, nvflare_peer_factory, managers, pki, caplog) -> None:
    """NVFlare's client over mutual TLS to our listener; then, while it is served, NVFlare
    clients our listener must refuse; last, NVFlare's own check of our server's CN."""
    caplog.set_level(logging.WARNING, logger="sfm_core")
    ours = managers("server")
    rx = Collector()
    ours.register_message_receiver(1, rx)
    tls = ours.add_connector(f"{scheme}://127.0.0.1:0", pki.server("server"), Mode.PASSIVE)
    plain = ours.add_connector(f"{PLAIN[scheme]}://127.0.0.1:0", {}, Mode.PASSIVE)
    wrong_cn = ours.add_connector(f"{scheme}://127.0.0.1:0", pki.server("not-server"), Mode.PASSIVE)
    ours.start()
    url, plain_url, wrong_url = (ours.wait_listening(h, scaled(10)) for h in (tls, plain, wrong_cn))

    nv = nvflare_peer_factory("site-1", app_ids=[1], properties={"impl": "nvflare"}, log_events="ERROR")
    nv.add_connector(url, "active", resources=pki.client("site-1"))
    nv.start()
    _exchange(ours, rx, nv, "server", "site-1")
    assert ours.find_endpoint("site-1").conn_props["peer_cn"] == "site-1"
    assert nv.find_endpoint("server")["conn_props"].get("peer_cn") == (None if scheme == "grpcs" else "server")
    [good] = ours.get_connections("site-1")

    # Every refused client claims the good client's own name "site-1": admitted, it would
    # replace the good connection (one connection per endpoint, on both sides).
    # A refused certificate ends the connection from our side (TLS alert, close): NVFlare's
    # client does not close first (it does not even close its socket, FINDINGS.md). Where the
    # listener answers the wrong protocol (an HTTP 400, HTTP/2 frames), the client may well
    # hang up first: who ends it is not asserted there. On stcp nobody answers a protocol it
    # does not speak, and NVFlare's tcp client waits for more: the listener ends it.
    mixed = SERVER if scheme == "stcp" else None
    refused = [
        ("a client certificate from another CA", scheme, url, pki.client("site-1", other_ca=True), SERVER),
        ("an expired client certificate", scheme, url, pki.client("site-1", expired=True), SERVER),
        ("no client certificate", scheme, url, pki.client("site-1", security="tls", cert=False), SERVER),
        ("plaintext to TLS", PLAIN[scheme], url, None, mixed),
        ("TLS to plaintext", scheme, plain_url, pki.client("site-1"), mixed),
    ]
    for what, s, target, resources, first_end in refused:
        with Relay(_port(target)) as relay:
            handle = nv.add_connector(relay.url(s), "active", resources=resources)
            try:
                ended = wait_until(relay.ended, timeout=20, what=f"{scheme}, {what}: a connection that ended")
            finally:
                nv.remove_connector(handle)
        if first_end is not None:
            assert ended[0].first_end == first_end, f"{scheme}, {what}: {ended[0]}"
        _still_served(ours, rx, nv, "server", "site-1", good, what)

    # A certificate for "site-2" claiming "site-1": TLS passes, our identity binding refuses
    # before READY, and says so.
    with Relay(_port(url)) as relay:
        handle = nv.add_connector(relay.url(scheme), "active", resources=pki.client("site-2"))
        try:
            wait_until(
                _logged(
                    caplog, "peer claims endpoint 'site-1' (identity 'site-1') but its certificate is for 'site-2'"
                ),
                timeout=20,
                what=f"{scheme}: our listener refusing a certificate for another name",
            )
        finally:
            nv.remove_connector(handle)
    _still_served(ours, rx, nv, "server", "site-1", good, "a certificate for another name")

    # Last (it may replace the good connection): our listener whose certificate is for
    # "not-server" while it claims "server". We admit site-1 (its certificate is right) and
    # answer READY; then NVFlare's client checks our CN, where its driver knows it.
    since = len(nv.events)
    nv.add_connector(wrong_url, "active", resources=pki.client("site-1"))
    if scheme == "grpcs":
        # NVFlare's gRPC client has no peer CN: it accepts the server and replaces its
        # connection to "server" with this one.
        wait_until(
            lambda: (
                (nv.find_endpoint("server") or {}).get("conn_props", {}).get("peer_addr")
                == f"127.0.0.1:{_port(wrong_url)}"
            ),
            timeout=20,
            what="NVFlare's grpcs client accepting a server certificate for another name",
        )
    else:
        nv.wait_for_log(
            r"authenticated as 'not-server' but claimed endpoint 'server' requires identity 'server'", 20, since
        )


# ---- we connect to an NVFlare listener -----------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_our_tls_client_and_nvflare_listener(scheme, nvflare_peer_factory, managers, pki, caplog) -> None:
    """Our client over mutual TLS to NVFlare's listener; then, while it is served, clients
    NVFlare's listener must refuse; last, our client's check of NVFlare's server CN."""
    caplog.set_level(logging.WARNING, logger="sfm_core")
    nv = nvflare_peer_factory("server", app_ids=[1], properties={"impl": "nvflare"}, log_events="ERROR")
    url = nv.listen(scheme, resources=pki.server("server"))
    plain_url = nv.listen(PLAIN[scheme])
    wrong_url = nv.listen(scheme, resources=pki.server("not-server"))
    nv.start()

    ours = managers("site-1")
    rx = Collector()
    ours.register_message_receiver(1, rx)
    ours.add_connector(url, pki.client("site-1"), Mode.ACTIVE)
    ours.start()
    _exchange(ours, rx, nv, "site-1", "server")
    # Our gRPC client does not know the server's CN (docs/security.md); the others do.
    assert ours.find_endpoint("server").conn_props.get("peer_cn") == (None if scheme == "grpcs" else "server")
    theirs = nv.find_endpoint("site-1")["conn_props"]
    assert theirs["peer_cn"] == "site-1"
    [good] = ours.get_connections("server")

    def bad_client(name: str, target_url: str, params: dict) -> tuple[ConnManager, StateLog]:
        bad = managers(name, heartbeat_interval=0.3)
        states = StateLog()
        bad.add_endpoint_monitor(states)
        bad.add_connector(target_url, params, Mode.ACTIVE)
        bad.start()
        return bad, states

    def nvflare_still_has_the_good_client(tag: str) -> None:
        assert nv.find_endpoint("site-1")["conn_props"]["peer_addr"] == theirs["peer_addr"], tag
        _still_served(ours, rx, nv, "site-1", "server", good, tag)

    # Who ends the connection first, where that is certain: NVFlare's TLS listener ends
    # plaintext (our plain client just waits for READY). A refused certificate: NVFlare sends
    # an alert and closes, and our client, reading the alert, may close first: not asserted.
    # TLS to NVFlare's plain tcp listener: it takes the ClientHello for a frame prefix and
    # waits for the rest, so our TLS handshake timeout ends it (FINDINGS.md); its grpc and
    # http listeners answer (HTTP/2 frames, an HTTP 400), and who hangs up first is open.
    tls_to_plain = {**pki.client("site-1"), "tls_handshake_timeout": scaled(1.0)}
    refused = [
        ("a client certificate from another CA", scheme, url, pki.client("site-1", other_ca=True), None),
        ("an expired client certificate", scheme, url, pki.client("site-1", expired=True), None),
        ("no client certificate", scheme, url, pki.client("site-1", security="tls", cert=False), None),
        ("plaintext to TLS", PLAIN[scheme], url, {}, SERVER),
        ("TLS to plaintext", scheme, plain_url, tls_to_plain, CLIENT if scheme == "stcp" else None),
    ]
    for what, s, target, params, first_end in refused:
        with Relay(_port(target)) as relay:
            bad, states = bad_client("site-1", relay.url(s), params)
            try:
                ended = wait_until(relay.ended, timeout=20, what=f"{scheme}, {what}: a connection that ended")
            finally:
                bad.stop()
        assert ("server", EndpointState.READY) not in states.events, f"{scheme}, {what}: {states.events}"
        if first_end is not None:
            assert ended[0].first_end == first_end, f"{scheme}, {what}: {ended[0]}"
        nvflare_still_has_the_good_client(what)

    # A certificate for "site-2" claiming "site-1": NVFlare answers READY first, then checks,
    # logs the mismatch and closes (on grpcs, once our client sends again: here a PING).
    since = len(nv.events)
    with Relay(_port(url)) as relay:
        bad, states = bad_client("site-1", relay.url(scheme), pki.client("site-2"))
        try:
            nv.wait_for_log(
                r"authenticated as 'site-2' but claimed endpoint 'site-1' requires identity 'site-1'", 20, since
            )
            wait_until(
                lambda: ("server", EndpointState.DISCONNECTED) in states.events,
                timeout=20,
                what=f"{scheme}: NVFlare closing the connection it answered READY",
            )
        finally:
            bad.stop()
    assert states.events[0] == ("server", EndpointState.READY)  # NVFlare's READY came before its check
    nvflare_still_has_the_good_client("a certificate for another name")

    # NVFlare's listener whose certificate is for "not-server" while it claims "server":
    # "site-3" (its own, right certificate) is admitted by NVFlare, then our client checks
    # the server's CN, where our driver knows it.
    since = len(nv.events)
    odd, states = bad_client("site-3", wrong_url, pki.client("site-3"))
    if scheme == "grpcs":
        wait_ready(odd, "server", timeout=20)  # gRPC checks the SAN (127.0.0.1), not the CN
    else:
        wait_until(
            _logged(
                caplog, "peer claims endpoint 'server' (identity 'server') but its certificate is for 'not-server'"
            ),
            timeout=20,
            what=f"{scheme}: our client refusing a server certificate for another name",
        )
        nv.wait_for_state("site-3", "DISCONNECTED", timeout=20, since=since)
        assert ("server", EndpointState.READY) not in states.events
    odd.stop()
    nvflare_still_has_the_good_client("a server certificate for another name")
