"""sfm's gRPC driver against a real NVFlare 2.9.0 endpoint over ``grpc://``, both directions."""

from __future__ import annotations

import hashlib
import os
import sys

import pytest

from sfm_core import ConnManager, Endpoint, EndpointState, Mode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import Collector, scaled, wait_ready, wait_until

MIB = 1024 * 1024
HEADERS = {"s": "text é", "i": 42, "neg": -7, "b": b"\x00\x01\xff", "l": [1, "two", b"\x03"], "d": {"k": "v", "n": 1}}
BIG = os.urandom(5 * MIB)


def _exchange(nv, sfm: ConnManager, sfm_rx: Collector, nv_name: str, sfm_name: str) -> None:
    """DATA both ways: mixed headers, empty and None payloads, 5 MiB; handshake properties."""
    ep = wait_ready(sfm, nv_name, timeout=20)
    nv.wait_for_state(sfm_name, "READY", timeout=20)
    assert ep.properties["role"] == "nv"
    seen = nv.find_endpoint(sfm_name)
    assert seen["state"] == "READY" and seen["properties"]["org"] == "sfm"
    # Our HELLO's offer is only a property to NVFlare; our READY to it offers nothing.
    # NVFlare sends no sfm_ext, so no extension is used on this connection.
    [sfm_conn] = sfm.get_connections(nv_name)
    assert sfm_conn.conn.extensions == frozenset()

    sfm.send_message(ep, 1, HEADERS, b"hello")
    sfm.send_message(ep, 1, {"kind": "empty"}, b"")
    sfm.send_message(ep, 1, {"kind": "none"}, None)
    sfm.send_message(ep, 1, {"kind": "big"}, BIG)
    got = {(m.headers or {}).get("kind", "mixed"): m for m in nv.wait_for_messages(4, timeout=30)}
    assert got["mixed"].headers == HEADERS and got["mixed"].payload == b"hello"
    assert got["empty"].payload is None and got["none"].payload is None
    assert got["big"].payload_len == len(BIG)
    assert got["big"].payload_sha256 == hashlib.sha256(BIG).hexdigest()
    assert sfm_conn.conn.stats["frames_out"] == sfm_conn.conn.stats["messages_out"]

    nv.send(sfm_name, 1, HEADERS, b"from nvflare")
    nv.send(sfm_name, 1, {"kind": "empty"}, b"")
    nv.send(sfm_name, 1, {"kind": "none"}, None)
    nv.send(sfm_name, 1, {"kind": "big"}, BIG, timeout=60)
    msgs = {(m[2] or {}).get("kind", "mixed"): m for m in sfm_rx.wait_for(4, timeout=30)}
    assert msgs["mixed"][2] == HEADERS and msgs["mixed"][3] == b"from nvflare"
    assert msgs["empty"][3] is None and msgs["none"][3] is None
    assert msgs["big"][3] == BIG


def _heartbeats_answered(sfm: ConnManager, nv_name: str) -> None:
    """With a 0.5 s heartbeat and dead_after=3, a silent peer is dropped after 1.5 s: staying
    connected and idle for several of those means NVFlare answered our PINGs with PONGs."""
    [conn] = sfm.get_connections(nv_name)
    connector = conn.conn.connector
    wait_until(lambda: conn.session.pongs_received >= 6, timeout=10, what="6 PONGs from NVFlare")
    assert sfm.find_endpoint(nv_name).state == EndpointState.READY
    assert sfm.get_connections(nv_name) == [conn]
    if connector is not None:
        assert connector.total_conns == 1


def test_nvflare_listens_sfm_connects(nvflare_peer_factory):
    nv = nvflare_peer_factory("server", app_ids=[1], properties={"role": "nv"}, heartbeat=0.5)
    url = nv.listen("grpc")
    nv.start()
    sfm = ConnManager(Endpoint("site-1", {"org": "sfm"}), heartbeat_interval=0.5)
    rx = Collector()
    sfm.register_message_receiver(1, rx)
    sfm.add_connector(url, {}, Mode.ACTIVE)
    sfm.start()
    try:
        _exchange(nv, sfm, rx, "server", "site-1")
        [conn] = sfm.get_connections("server")
        assert conn.conn.get_conn_properties()["peer_addr"] == "ipv4:" + url.split("://")[1]
        _heartbeats_answered(sfm, "server")
    finally:
        sfm.stop()


def test_sfm_listens_nvflare_connects(nvflare_peer_factory):
    sfm = ConnManager(Endpoint("server", {"org": "sfm"}), heartbeat_interval=0.5)
    rx = Collector()
    sfm.register_message_receiver(1, rx)
    h = sfm.add_connector("grpc://127.0.0.1:0", {}, Mode.PASSIVE)
    sfm.start()
    try:
        url = sfm.wait_listening(h, scaled(10))
        nv = nvflare_peer_factory("site-1", app_ids=[1], properties={"role": "nv"}, heartbeat=0.5)
        nv.add_connector(url, "active")
        nv.start()
        _exchange(nv, sfm, rx, "site-1", "server")
        [conn] = sfm.get_connections("site-1")
        assert conn.conn.get_conn_properties()["peer_addr"].startswith("ipv4:127.0.0.1:")
        _heartbeats_answered(sfm, "site-1")
        nv.stop()
        ep = sfm.find_endpoint("site-1")
        # NVFlare's stop ends our connection.
        wait_until(lambda: ep is None or ep.state != EndpointState.READY, timeout=10, what="site-1 no longer READY")
    finally:
        sfm.stop()


@pytest.mark.parametrize("count", [200])
def test_order_from_sfm_to_nvflare(nvflare_peer_factory, count):
    nv = nvflare_peer_factory("server", app_ids=[1], properties={"role": "nv"})
    url = nv.listen("grpc")
    nv.start()
    sfm = ConnManager(Endpoint("site-1", {"org": "sfm"}))
    sfm.add_connector(url, {}, Mode.ACTIVE)
    sfm.start()
    try:
        ep = wait_ready(sfm, "server", timeout=20)
        for i in range(count):
            sfm.send_message(ep, 1, {"i": i}, b"x" * 100)
        msgs = nv.wait_for_messages(count, timeout=30)
        # NVFlare may reorder on its side (thread pool); every message arrives, each as one frame.
        assert sorted(m.headers["i"] for m in msgs) == list(range(count))
    finally:
        sfm.stop()
