"""Self-tests of the NVFlare interop harness: NVFlare talking to NVFlare, no sfm code.

They prove that ``NvflarePeer`` / ``nvflare_peer.py`` drive a real NVFlare 2.9.0
endpoint correctly, and they pin down NVFlare behaviours the sfm tests rely on
(e.g. an empty payload arrives as None, handshake properties carry "timestamp").
"""

from __future__ import annotations

import hashlib
import os
import threading

import pytest
from helpers import scaled
from peer import NvflarePeer, NvflarePeerError, free_port

MIB = 1024 * 1024

MIXED_HEADERS = {
    "s": "text é",
    "i": 42,
    "neg": -7,
    "big": 2**40,
    "b": b"\x00\x01\xff",
    "l": [1, "two", b"\x03", [4]],
    "d": {"k": "v", "n": 1, "raw": b"\xfe"},
    "f": 1.5,
    "t": True,
    "none": None,
}


def _pair(factory, scheme, *, server_kwargs=None, client_kwargs=None):
    server = factory("server", app_ids=[1, 2, 3], properties={"role": "srv", "n": 7}, **(server_kwargs or {}))
    client = factory(
        "site-1", app_ids=[1, 2, 3], properties={"role": "cli", "blob": b"\x01\x02"}, **(client_kwargs or {})
    )
    url = server.listen(scheme)
    server.start()
    client.add_connector(url, "active")
    client.start()
    return server, client


@pytest.mark.parametrize("scheme", ["tcp", "grpc", "http"])
def test_two_nvflare_peers_exchange_messages(nvflare_peer_factory, scheme):
    server, client = _pair(nvflare_peer_factory, scheme)

    # handshake seen on both sides, with names and public properties
    ev_s = server.wait_for_state("site-1", "READY")
    ev_c = client.wait_for_state("server", "READY")
    assert ev_s["properties"]["role"] == "cli"
    assert ev_c["properties"] == {"role": "srv", "n": 7, "timestamp": ev_c["properties"]["timestamp"]}
    # the handshake "timestamp" stays in the remote endpoint's properties, as a float
    assert isinstance(ev_c["properties"]["timestamp"], float)
    ep = server.find_endpoint("site-1")
    assert ep["name"] == "site-1" and ep["state"] == "READY"
    assert ep["properties"]["blob"] == b"\x01\x02"  # bytes survive the handshake map
    assert client.find_endpoint("nobody") is None

    # client -> server: mixed headers, normal, empty and None payloads
    client.send("server", 1, dict(MIXED_HEADERS, i=0), b"hello")
    client.send("server", 2, {"i": 1}, b"")
    client.send("server", 3, {"i": 2}, None)
    client.send("server", 1, None, b"no headers")
    got = server.wait_for_messages(4)
    by_i = {(m.headers or {}).get("i", "noh"): m for m in got}  # nvflare may reorder
    assert set(by_i) == {0, 1, 2, "noh"}
    m0 = by_i[0]
    assert m0.sender == "site-1" and m0.app_id == 1 and m0.payload == b"hello"
    assert m0.headers == dict(MIXED_HEADERS, i=0)
    assert by_i[1].app_id == 2 and by_i[1].payload is None  # empty payload arrives as None
    assert by_i[1].payload_type == "NoneType"
    assert by_i[2].app_id == 3 and by_i[2].payload is None and by_i[2].payload_type == "NoneType"
    assert by_i["noh"].headers is None and by_i["noh"].payload == b"no headers"
    # payload type nvflare hands to receivers: tcp bytearray, grpc/http bytes
    assert m0.payload_type == {"tcp": "bytearray", "grpc": "bytes", "http": "bytes"}[scheme]

    # server -> client
    server.send("site-1", 2, {"dir": "down", "b": b"\x00"}, bytearray(b"x" * 1000))
    [m] = client.wait_for_messages(1)
    assert (m.sender, m.app_id, m.headers, m.payload) == ("server", 2, {"dir": "down", "b": b"\x00"}, b"x" * 1000)

    client.stop()
    server.wait_for_state("site-1", "DISCONNECTED")


@pytest.mark.parametrize("scheme", ["tcp", "grpc"])
def test_5mib_payload_both_directions(nvflare_peer_factory, scheme):
    server, client = _pair(nvflare_peer_factory, scheme)
    server.wait_for_state("site-1", "READY")
    client.wait_for_state("server", "READY")
    big = os.urandom(5 * MIB)
    client.send("server", 1, {"size": len(big)}, big)
    [m] = server.wait_for_messages(1, timeout=30)
    assert m.payload_len == len(big) and m.payload == big
    assert m.payload_sha256 == hashlib.sha256(big).hexdigest()
    server.send("site-1", 1, {"size": len(big)}, big)
    [m] = client.wait_for_messages(1, timeout=30)
    assert m.payload == big


def test_5mib_payload_http_active_to_passive(nvflare_peer_factory):
    # Only active -> passive: NVFlare's active http side (aiohttp client, default
    # max_msg_size 4 MiB) cannot receive frames over 4 MiB.
    server, client = _pair(nvflare_peer_factory, "http")
    server.wait_for_state("site-1", "READY")
    big = os.urandom(5 * MIB)
    client.send("server", 1, None, big)
    [m] = server.wait_for_messages(1, timeout=30)
    assert m.payload == big


def test_echo_and_repeat(nvflare_peer_factory):
    server = nvflare_peer_factory("server", app_ids=[], echo=9, payload_in_events=False)
    client = nvflare_peer_factory("site-2", app_ids=[9])
    url = server.listen("tcp")
    server.start()
    client.add_connector(url, "active")
    client.start()
    client.wait_for_state("server", "READY")
    client.send("server", 9, {"k": [1, b"\x02"]}, b"ping-me", repeat=3)
    back = client.wait_for_messages(3)
    assert [(m.sender, m.app_id, m.headers, m.payload) for m in back] == [
        ("server", 9, {"k": [1, b"\x02"]}, b"ping-me")
    ] * 3
    seen = server.wait_for_messages(3)
    assert all(m.payload is None and m.payload_len == 7 and m.raw["echoed"] for m in seen)


def test_errors_carry_stderr_and_no_leaks(nvflare_peer_factory, nvflare_python):
    fds_before = len(os.listdir("/proc/self/fd"))
    threads_before = threading.active_count()
    with NvflarePeer("lonely", python=nvflare_python) as p:
        with pytest.raises(NvflarePeerError, match="not known"):
            p.send("nobody", 1, None, b"x")
        with pytest.raises(NvflarePeerError, match="unknown cmd"):
            p.command("no_such_command")
        with pytest.raises(NvflarePeerError, match="No driver found"):
            p.add_connector(f"bogus://127.0.0.1:{free_port()}", "active")
        # the process is still usable after errors
        assert p.command("ping")["ok"] is True
        stderr_path = p._stderr_path
        assert os.path.exists(stderr_path)
    assert p.proc.returncode is not None
    assert not os.path.exists(stderr_path)
    assert threading.active_count() == threads_before
    assert len(os.listdir("/proc/self/fd")) == fds_before
    with pytest.raises(NvflarePeerError, match="closed"):
        p.start()


def test_dead_process_is_reported(nvflare_python):
    p = NvflarePeer("doomed", python=nvflare_python)
    try:
        p.proc.kill()
        p.proc.wait(scaled(10))
        with pytest.raises(NvflarePeerError, match="exited with"):
            p.wait_for_messages(1, timeout=5)
        with pytest.raises(NvflarePeerError):
            p.start()
    finally:
        p.close()
