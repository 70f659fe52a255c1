"""sfm's WebSocket driver against a real NVFlare 2.9.0 endpoint over ``http://``, both directions."""

from __future__ import annotations

import hashlib
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/helpers.py
from helpers import Collector, scaled, wait_ready, wait_until

from sfm_core import ConnManager, Endpoint, EndpointState, FrameReceiver, Mode
from sfm_core.frames import FrameType, decode_frame

pytest.importorskip("sfm_driver_websocket")

MIB = 1024 * 1024
HEADERS = {
    "s": "text é",
    "i": 42,
    "neg": -7,
    "b": b"\x00\x01\xff",
    "l": [1, "two", b"\x03", [4]],
    "d": {"k": "v", "n": 1, "raw": b"\xfe"},
}
BIG = 5 * MIB
#: NVFlare's heartbeat interval, scaled as the waits are (a slow machine stretches the test).
#: NVFlare pings only a connection silent that long; ours pings every interval whatever the
#: traffic, so ours beats at twice that, or NVFlare would never find us silent and never ping.
HEARTBEAT = scaled(0.5)
OUR_HEARTBEAT = 2 * HEARTBEAT
# NVFlare's active http side (aiohttp client default) drops messages over 4 MiB: what we send to it.
BIG_TO_NVFLARE_CLIENT = 4 * MIB - 64 * 1024


class FrameSpy(FrameReceiver):
    """Records the type of every frame a connection receives, then passes it on."""

    def __init__(self, inner: FrameReceiver) -> None:
        self.inner = inner
        self.types: list[int] = []

    def process_frame(self, frame) -> None:
        self.process_frames((frame,))

    def process_frames(self, frames) -> None:
        self.types.extend(decode_frame(f).type for f in frames)
        self.inner.process_frames(frames)


def spy_on(manager: ConnManager, peer: str) -> tuple[FrameSpy, list[int]]:
    """Spy on received and sent frame types of the one connection to ``peer``."""
    [sfm_conn] = manager.get_connections(peer)
    conn = sfm_conn.conn
    spy = FrameSpy(conn.frame_receiver)
    conn.frame_receiver = spy
    sent: list[int] = []
    original, original_urgent = conn.send_frame, conn.send_urgent

    def send_frame(frame):
        sent.append(frame[0][6] if isinstance(frame, list) else frame[6])
        original(frame)

    def send_urgent(frame):
        taken = original_urgent(frame)
        if taken:
            sent.append(frame[6])
        return taken

    conn.send_frame = send_frame
    conn.send_urgent = send_urgent
    return spy, sent


def _payloads(big: int) -> list:
    data = os.urandom(big)
    return [(0, b"hello"), (1, b""), (2, None), (3, data)]


def _check_handshake(ours: ConnManager, nv, our_name: str, nv_name: str) -> None:
    ep = ours.find_endpoint(nv_name)
    assert ep.state == EndpointState.READY
    assert ep.properties["role"] == "nv" and ep.properties["n"] == 7
    assert isinstance(ep.properties["timestamp"], float)
    assert ep.conn_props["peer_addr"].startswith("127.0.0.1:")
    assert ep.conn_props["local_addr"].startswith("127.0.0.1:")
    theirs = nv.find_endpoint(our_name)
    assert theirs["state"] == "READY"
    assert theirs["properties"]["role"] == "sfm" and theirs["properties"]["blob"] == b"\x01\x02"
    assert isinstance(theirs["properties"]["timestamp"], float)


def _exchange(ours: ConnManager, col: Collector, nv, our_name: str, nv_name: str, big_to_nv: int) -> None:
    # sfm -> NVFlare (NVFlare may reorder: match by header "k")
    for k, payload in _payloads(big_to_nv):
        ours.send_message(ours.find_endpoint(nv_name), 1, {**HEADERS, "k": k}, payload)
    sent = dict(_payloads(0))
    got = {m.headers["k"]: m for m in nv.wait_for_messages(4, timeout=30)}
    for k in range(3):
        m = got[k]
        assert m.sender == our_name and m.app_id == 1
        assert {key: v for key, v in m.headers.items() if key != "k"} == HEADERS
        assert m.payload == (sent[k] or None)  # NVFlare turns an empty payload into None
    assert got[3].payload_len == big_to_nv

    # NVFlare -> sfm, 5 MiB included
    big = os.urandom(BIG)
    for k, payload in [(0, b"hello"), (1, b""), (2, None), (3, big)]:
        nv.send(our_name, 1, {**HEADERS, "k": k}, payload)
    msgs = {m[2]["k"]: m for m in col.wait_for(4, 30)}
    for k, expected in [(0, b"hello"), (1, None), (2, None)]:
        sender, app_id, headers, payload, _ = msgs[k]
        assert (sender, app_id, payload) == (nv_name, 1, expected)
        assert {key: v for key, v in headers.items() if key != "k"} == HEADERS
    assert hashlib.sha256(msgs[3][3]).digest() == hashlib.sha256(big).digest()


def _check_heartbeat(ours: ConnManager, nv, our_name: str, nv_name: str) -> None:
    spy, sent = spy_on(ours, nv_name)
    downs_before = len(nv.state_events(our_name))
    # Stay silent and watch PING/PONG go both ways.
    wait_until(
        lambda: {FrameType.PING, FrameType.PONG} <= set(spy.types) and {FrameType.PING, FrameType.PONG} <= set(sent),
        timeout=8.0,
        what=f"PING and PONG both ways (received {spy.types}, sent {sent})",
    )
    time.sleep(scaled(1.0))
    # The connection stayed up through the silence on both sides.
    assert ours.find_endpoint(nv_name).state == EndpointState.READY
    assert len(nv.state_events(our_name)) == downs_before
    assert nv.find_endpoint(our_name)["state"] == "READY"


def _ours(name: str) -> tuple[ConnManager, Collector]:
    cm = ConnManager(Endpoint(name, {"role": "sfm", "blob": b"\x01\x02"}), heartbeat_interval=OUR_HEARTBEAT)
    col = Collector()
    cm.register_message_receiver(1, col)
    return cm, col


def test_nvflare_listener_sfm_connector(nvflare_peer_factory):
    nv = nvflare_peer_factory("server", app_ids=[1], properties={"role": "nv", "n": 7}, heartbeat=HEARTBEAT)
    url = nv.listen("http")
    nv.start()
    ours, col = _ours("site-1")
    try:
        ours.add_connector(url, {}, Mode.ACTIVE)
        ours.start()
        wait_ready(ours, "server", 15)
        nv.wait_for_state("site-1", "READY")
        _check_handshake(ours, nv, "site-1", "server")
        _exchange(ours, col, nv, "site-1", "server", BIG)
        _check_heartbeat(ours, nv, "site-1", "server")
    finally:
        ours.stop()


def test_sfm_listener_nvflare_connector(nvflare_peer_factory):
    ours, col = _ours("server")
    try:
        h = ours.add_connector("http://127.0.0.1:0", {}, Mode.PASSIVE)
        ours.start()
        url = ours.wait_listening(h, scaled(10))
        assert url.startswith("http://127.0.0.1:")
        nv = nvflare_peer_factory("site-1", app_ids=[1], properties={"role": "nv", "n": 7}, heartbeat=HEARTBEAT)
        nv.add_connector(url, "active")
        nv.start()
        wait_ready(ours, "site-1", 15)
        nv.wait_for_state("server", "READY")
        _check_handshake(ours, nv, "server", "site-1")
        _exchange(ours, col, nv, "server", "site-1", BIG_TO_NVFLARE_CLIENT)
        _check_heartbeat(ours, nv, "server", "site-1")
    finally:
        ours.stop()
