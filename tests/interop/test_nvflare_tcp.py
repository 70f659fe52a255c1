"""sfm over tcp:// against a real NVFlare 2.9.0 endpoint, both directions."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from helpers import Collector, wait_ready, wait_until
from peer import free_port

from sfm_core import ConnManager, Endpoint, Mode

HEADERS = {"s": "text", "i": 42, "neg": -3, "b": b"\x00\x01", "l": [1, "two", b"3"], "d": {"k": "v", "n": [1]}}
FIVE_MIB = bytes(range(256)) * (5 * 4096)


@pytest.fixture
def sfm_manager():
    made: list[ConnManager] = []

    def make(name: str, **kwargs) -> ConnManager:
        m = ConnManager(Endpoint(name, {"impl": "sfm"}), **kwargs)
        made.append(m)
        return m

    yield make
    for m in made:
        m.stop()


def _exchange(ours: ConnManager, nv, our_name: str, their_name: str) -> None:
    got = Collector()
    ours.register_message_receiver(1, got)
    their_ep = wait_ready(ours, their_name, timeout=15)
    seen = nv.wait_for_state(our_name, "READY")
    # Handshake: names and properties on both sides.
    assert seen["properties"]["impl"] == "sfm"
    assert their_ep.properties["impl"] == "nvflare"

    # sfm -> NVFlare: headers of many types, empty and None payloads, 5 MiB.
    ours.send_message(their_ep, 1, HEADERS, b"hello nvflare")
    ours.send_message(their_ep, 1, {"kind": "empty"}, b"")
    ours.send_message(their_ep, 1, {"kind": "none"}, None)
    ours.send_message(their_ep, 1, {"kind": "big"}, FIVE_MIB)
    msgs = {m.headers.get("kind", "first"): m for m in nv.wait_for_messages(4, timeout=30)}
    assert msgs["first"].headers == HEADERS and msgs["first"].payload == b"hello nvflare"
    assert msgs["first"].sender == our_name
    assert msgs["empty"].payload is None and msgs["none"].payload is None
    assert msgs["big"].payload_len == len(FIVE_MIB) and msgs["big"].payload == FIVE_MIB

    # NVFlare -> sfm: the same.
    nv.send(our_name, 1, HEADERS, b"hello sfm")
    nv.send(our_name, 1, {"kind": "empty"}, b"")
    nv.send(our_name, 1, {"kind": "none"}, None)
    nv.send(our_name, 1, {"kind": "big"}, FIVE_MIB)
    received = {(m[2] or {}).get("kind", "first"): m for m in got.wait_for(4, timeout=30)}
    assert received["first"][:4] == (their_name, 1, HEADERS, b"hello sfm")
    assert received["empty"][3] is None and received["none"][3] is None
    assert received["big"][3] == FIVE_MIB


def _heartbeat_survives(ours: ConnManager, their_name: str) -> None:
    conn = ours.get_connections(their_name)[0]
    # NVFlare answers our PINGs: several dead_after periods (0.9 s) pass on PONGs alone.
    wait_until(lambda: conn.session.pongs_received >= 10, timeout=10, what="10 PONGs from NVFlare")
    assert ours.get_connections(their_name)[0] is conn


def test_nvflare_connects_to_our_tcp_listener(nvflare_peer_factory, sfm_manager) -> None:
    ours = sfm_manager("server", heartbeat_interval=0.3, heartbeat_check=0.05)
    handle = ours.add_connector("tcp://127.0.0.1:0", {}, Mode.PASSIVE)
    ours.start()
    url = ours.wait_listening(handle)
    nv = nvflare_peer_factory("site-1", app_ids=[1], properties={"impl": "nvflare"}, heartbeat=0.5)
    nv.add_connector(url, "active")
    nv.start()
    _exchange(ours, nv, "server", "site-1")
    _heartbeat_survives(ours, "site-1")


def test_we_connect_to_an_nvflare_tcp_listener(nvflare_peer_factory, sfm_manager) -> None:
    nv = nvflare_peer_factory("server", app_ids=[1], properties={"impl": "nvflare"}, heartbeat=0.5)
    url = nv.listen("tcp", port=free_port())
    nv.start()
    ours = sfm_manager("site-1", heartbeat_interval=0.3, heartbeat_check=0.05)
    ours.add_connector(url, {}, Mode.ACTIVE)
    ours.start()
    _exchange(ours, nv, "site-1", "server")
    _heartbeat_survives(ours, "server")
