"""Delivery through per-connection lanes (event-loop drivers), seen through the WebSocket driver."""

from __future__ import annotations

import pytest
from helpers import StateLog, scaled, wait_until

from sfm_core import ConnManager, Endpoint, EndpointState, FrameType, Mode
from sfm_core.frames import PREFIX, decode_frame, encode_frame
from sfm_core.handshake import build_handshake

websockets_client = pytest.importorskip("websockets.sync.client")


def test_bad_data_after_the_handshake_still_tells_monitors_disconnected() -> None:
    server = ConnManager(Endpoint("server"))
    log = StateLog()
    server.add_endpoint_monitor(log)
    handle = server.add_connector("ws://127.0.0.1:0", {}, Mode.PASSIVE)
    server.start()
    try:
        url = server.wait_listening(handle, scaled(5)) + "/f3"
        with websockets_client.connect(url) as ws:
            ws.send(b"".join(encode_frame(FrameType.HELLO, 0, 1, None, build_handshake("site-1", {}))))
            assert decode_frame(ws.recv(scaled(5))).type == FrameType.READY
            wait_until(lambda: log.events, what="READY")
            ws.send(PREFIX.pack(17, 1, 1, 0, 0, 1, 17, 2) + b"\x01")  # headers: msgpack 1, not a map
            wait_until(lambda: len(log.events) == 2, what="DISCONNECTED")
        assert log.events == [("site-1", EndpointState.READY), ("site-1", EndpointState.DISCONNECTED)]
        assert server.find_endpoint("site-1") is None
    finally:
        server.stop()
