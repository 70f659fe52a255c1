"""Byte-level facts about NVFlare 2.9.0 over tcp://, checked with raw sockets.

These pin down what docs/wire-protocol.md and tests/interop/FINDINGS.md say about
the real NVFlare, so a change of NVFlare version that breaks them is noticed.
No sfm code is used: a raw socket plays the other side.
"""

from __future__ import annotations

import socket
import struct
import time

import pytest
from helpers import scaled, wait_until
from peer import free_port

msgpack = pytest.importorskip("msgpack")

PREFIX = struct.Struct(">IHBBHHHH")
DATA, FRAG, ACK, HELLO, READY, PING, PONG = 1, 2, 3, 4, 5, 6, 7


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_frame(s: socket.socket, timeout: float = 5.0):
    """The next frame, waiting up to ``scaled(timeout)`` for it."""
    s.settimeout(scaled(timeout))
    pre = _recv_exact(s, 16)
    fields = PREFIX.unpack(pre)
    rest = _recv_exact(s, fields[0] - 16)
    return fields, pre + rest


def make_frame(ftype, stream_id, seq, payload=b"", headers=None, app_id=0, flags=0, reserved=0):
    hb = msgpack.packb(headers) if headers else b""
    return (
        PREFIX.pack(16 + len(hb) + len(payload), len(hb), ftype, reserved, flags, app_id, stream_id, seq) + hb + payload
    )


def connection_state(s: socket.socket, wait: float = 0.4) -> str:
    """ "closed", "data", or "open" if neither within ``scaled(wait)``."""
    s.settimeout(scaled(wait))
    try:
        return "closed" if s.recv(1, socket.MSG_PEEK) == b"" else "data"
    except TimeoutError:
        return "open"
    except OSError:
        return "closed"


def test_nvflare_active_side_bytes(nvflare_peer_factory):
    """HELLO / DATA / PING exactly as NVFlare's active side sends them."""
    port = free_port()
    with socket.socket() as ls:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", port))
        ls.listen(1)
        nv = nvflare_peer_factory("site-1", properties={"p": "v", "n": 3}, heartbeat=0.5)
        nv.add_connector(f"tcp://127.0.0.1:{port}", "active")
        nv.start()
        ls.settimeout(scaled(10))
        s, _ = ls.accept()
        with s:
            (_length, hl, ftype, res, flags, app, sid, seq), raw = recv_frame(s)
            assert (hl, ftype, res, flags, app, sid, seq) == (0, HELLO, 0, 0, 0, 1, 1)
            hello = msgpack.unpackb(raw[16:])
            assert list(hello) == ["endpoint_name", "timestamp", "p", "n"]  # properties merged last
            assert hello["endpoint_name"] == "site-1" and (hello["p"], hello["n"]) == ("v", 3)
            assert isinstance(hello["timestamp"], float) and raw[16 + 1 + 14 + 7 + 10] == 0xCB  # float64
            s.sendall(make_frame(READY, 1, 1, msgpack.packb({"endpoint_name": "raw", "timestamp": time.time()})))
            nv.wait_for_state("raw", "READY")

            nv.send("raw", 1, {"h": "v", "n": 1}, b"payload!")
            nv.send("raw", 7, None, b"")
            data_frames, pings_before = [], 0
            while len(data_frames) < 2:
                fields, raw = recv_frame(s)
                if fields[2] == PING:  # a slow machine may let a heartbeat slip in; it uses the counters too
                    pings_before += 1
                    continue
                data_frames.append((raw, pings_before))
            (raw1, _p1), (raw2, p2) = data_frames
            assert (
                raw1[:12] + raw1[16:] == bytes.fromhex("00000020 0008 01 00 0000 0001 82a168a176a16e01") + b"payload!"
            )
            # empty payload: a bare prefix
            assert raw2[:12] + raw2[16:] == bytes.fromhex("00000010 0000 01 00 0000 0007")
            if p2 == 0:
                # stream_id: per endpoint counter, first use 17; sequence: per connection, HELLO was 1
                assert (raw1[12:16], raw2[12:16]) == (bytes.fromhex("0011 0002"), bytes.fromhex("0012 0003"))

            # with --heartbeat 0.5 and silence from us, a PING with payload nil (0xC0) comes within 3 s
            fields, raw = recv_frame(s, timeout=3)
            assert raw[:12] + raw[16:] == bytes.fromhex("00000011 0000 06 00 0000 0000 c0")
            if p2 == 0:
                assert raw[12:16] == bytes.fromhex("0013 0004")  # PING shares both counters with DATA


def test_nvflare_passive_side_behaviour(nvflare_peer_factory):
    port = free_port()
    nv = nvflare_peer_factory("server", app_ids=[1], properties={"role": "srv"})
    nv.add_connector(f"tcp://127.0.0.1:{port}", "passive")
    nv.start()

    def connect():
        def attempt():
            try:
                return socket.create_connection(("127.0.0.1", port), timeout=scaled(5))
            except OSError:
                return None

        return wait_until(attempt, timeout=10, what=f"NVFlare listening on port {port}")

    with connect() as s:
        s.sendall(make_frame(HELLO, 1, 1, msgpack.packb({"endpoint_name": "rawcli", "timestamp": time.time()})))
        (length, hl, ftype, res, flags, app, sid, seq), raw = recv_frame(s)
        assert length == len(raw) and (hl, ftype, res, flags, app, sid, seq) == (0, READY, 0, 0, 0, 1, 1)
        ready = msgpack.unpackb(raw[16:])
        assert list(ready) == ["endpoint_name", "timestamp", "role"] and ready["endpoint_name"] == "server"
        nv.wait_for_state("rawcli", "READY")

        # sequence numbers, flags and reserved are not checked
        s.sendall(make_frame(DATA, 17, 500, b"a", app_id=1))
        s.sendall(make_frame(DATA, 18, 3, b"b", app_id=1, flags=0x4000, reserved=9))
        # unknown frame types (and FRAG/ACK) are logged and ignored; the connection stays
        for t in (99, FRAG, ACK):
            s.sendall(make_frame(t, 19, 4, b"\xc0"))
        s.sendall(make_frame(DATA, 20, 5, b"c", app_id=1))
        got = nv.wait_for_messages(3)
        assert sorted(m.payload for m in got) == [b"a", b"b", b"c"]
        assert connection_state(s) == "open"

        # PING with no payload, nil or a map: PONG with payload nil, stream_id from the per endpoint counter
        for i, pl in enumerate((b"", b"\xc0", msgpack.packb({"a": 1}))):
            s.sendall(make_frame(PING, 30, 6 + i, pl))
            (length, hl, ftype, _res, _flags, app, sid, seq), raw = recv_frame(s)
            assert (ftype, length, raw[16:], sid, seq) == (PONG, 17, b"\xc0", 17 + i, 2 + i)

    # a HELLO without endpoint_name is still answered with READY and the connection is NOT closed
    with connect() as s:
        s.sendall(make_frame(HELLO, 1, 1, msgpack.packb({"timestamp": time.time()})))
        fields, raw = recv_frame(s)
        assert fields[2] == READY
        assert connection_state(s) == "open"
    # an invalid name (FQCN validation) gets READY too, then the connection is closed
    with connect() as s:
        s.sendall(make_frame(HELLO, 1, 1, msgpack.packb({"endpoint_name": "a.a"})))
        fields, raw = recv_frame(s)
        assert fields[2] == READY
        assert connection_state(s, 2.0) == "closed"
    # a frame length below 16 closes the connection
    with connect() as s:
        s.sendall(PREFIX.pack(8, 0, DATA, 0, 0, 1, 17, 1))
        assert connection_state(s, 2.0) == "closed"
