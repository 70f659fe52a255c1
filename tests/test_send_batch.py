"""ConnManager.send_messages: many messages under one lock, their heads packed in one loop,
one sendmsg on the TCP driver (payloads not copied); checked before anything is sent."""

from __future__ import annotations

import socket
import time

import pytest
from helpers import Collector, scaled, wait_ready

from sfm_core import CommError, ConnManager, Endpoint, Mode
from sfm_core.pki import make_pki


@pytest.fixture
def managers():
    made: list[ConnManager] = []

    def make(name: str, **kwargs) -> ConnManager:
        m = ConnManager(Endpoint(name), **kwargs)
        made.append(m)
        return m

    yield make
    for m in made:
        m.stop()


def pair(managers, scheme: str = "tcp", server_params: dict | None = None, client_params: dict | None = None, **kw):
    server = managers("server", **kw)
    got = Collector()
    server.register_message_receiver(1, got)
    handle = server.add_connector(f"{scheme}://127.0.0.1:0", server_params or {}, Mode.PASSIVE)
    server.start()
    url = server.wait_listening(handle, scaled(5))
    client = managers("bench-client", **kw)
    client.add_connector(url, client_params or {}, Mode.ACTIVE)
    client.start()
    return server, client, wait_ready(client, "server"), got


class SpySocket:
    """Stands in for a connection's socket, recording what send/sendmsg were given."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.calls: list = []

    def sendmsg(self, bufs, *args):
        self.calls.append(("sendmsg", list(bufs)))
        return self._sock.sendmsg(bufs, *args)

    def send(self, data, *args):
        self.calls.append(("send", [data]))
        return self._sock.send(data, *args)

    def __getattr__(self, name):
        return getattr(self._sock, name)


def test_a_batch_arrives_in_order(managers) -> None:
    _server, client, to_server, got = pair(managers)
    client.send_messages(to_server, 1, [({"i": i}, b"m%d" % i) for i in range(3000)])
    client.send_message(to_server, 1, {"i": 3000}, b"after")
    msgs = got.wait_for(3001)
    assert [m[2]["i"] for m in msgs] == list(range(3001))
    assert msgs[5][3] == b"m5" and msgs[3000][3] == b"after"


def test_payloads_reach_sendmsg_as_they_are_in_one_call(managers) -> None:
    _server, client, to_server, got = pair(managers)
    [sfm_conn] = client.get_connections("server")
    spy = SpySocket(sfm_conn.conn.sock)
    sfm_conn.conn.sock = spy
    try:
        payloads = [memoryview(bytearray(b"%d" % i * 3000)) for i in range(5)]
        client.send_messages(to_server, 1, [(None, p) for p in payloads])
    finally:
        sfm_conn.conn.sock = spy._sock
    assert len(spy.calls) == 1  # one syscall for the five frames
    kind, bufs = spy.calls[0]
    assert kind == "sendmsg" and len(bufs) == 10  # head, payload, head, payload, ...
    for p in payloads:
        assert any(b is p for b in bufs)  # the caller's memoryview itself: not copied
    assert [m[3] for m in got.wait_for(5)] == [bytes(p) for p in payloads]


def test_a_frame_over_the_limit_refuses_the_batch_before_anything_is_sent(managers) -> None:
    _server, client, to_server, got = pair(managers, max_frame_size=64 * 1024)
    with pytest.raises(CommError) as err:
        client.send_messages(to_server, 1, [(None, b"first"), (None, b"x" * (100 * 1024)), (None, b"third")])
    assert err.value.code == CommError.BAD_DATA
    client.send_message(to_server, 1, None, b"marker")
    assert [m[3] for m in got.wait_for(1)] == [b"marker"]  # nothing of the refused batch went out


def test_a_batch_to_an_endpoint_without_a_connection_raises_closed(managers) -> None:
    server, client, to_server, _got = pair(managers)
    server.stop()
    with pytest.raises(CommError) as err:
        deadline = time.monotonic() + scaled(5)
        while time.monotonic() < deadline:  # until the client has seen the connection go
            client.send_messages(to_server, 1, [(None, b"a"), (None, b"b")])
            time.sleep(0.01)
    assert err.value.code == CommError.CLOSED
    for batch in ([(None, b"a")], []):  # an empty batch names a missing endpoint too
        with pytest.raises(CommError) as err:
            client.send_messages(Endpoint("nobody"), 1, batch)
        assert err.value.code == CommError.CLOSED


def test_an_empty_batch_sends_nothing(managers) -> None:
    _server, client, to_server, got = pair(managers)
    client.send_messages(to_server, 1, [])
    client.send_message(to_server, 1, None, b"only")
    assert [m[3] for m in got.wait_for(1)] == [b"only"]


def test_a_batch_over_tls_and_over_a_driver_without_send_frames(managers, tmp_path) -> None:
    pki = make_pki(str(tmp_path), "server", "bench-client")
    _s, client, to_server, got = pair(managers, "stcp", pki.server, pki.client)
    client.send_messages(to_server, 1, [({"i": i}, b"t" * (i * 10)) for i in range(300)])
    msgs = got.wait_for(300)
    assert [m[2]["i"] for m in msgs] == list(range(300)) and msgs[299][3] == b"t" * 2990
    _s2, ws_client, to_ws, ws_got = pair(managers, "ws")
    assert getattr(ws_client.get_connections("server")[0].conn, "send_frames", None) is None
    ws_client.send_messages(to_ws, 1, [({"i": i}, b"w%d" % i) for i in range(100)])
    assert [m[3] for m in ws_got.wait_for(100)] == [b"w%d" % i for i in range(100)]


@pytest.mark.parametrize("handoff", ["true", "false"])
def test_stream_handoff_is_a_connector_parameter(managers, monkeypatch, handoff) -> None:
    """``stream_handoff=false`` keeps every frame of a streaming thread with that thread;
    by default its back-to-back small frames go out in the background writer's batches."""
    import sfm_core.frame_writer as fw

    monkeypatch.setattr(fw, "STREAM_GAP", 60.0)  # every send counts as back to back
    server, client, ep, got = pair(managers, client_params={"stream_handoff": handoff})
    for i in range(300):
        client.send_message(ep, 1, None, b"%d" % i)
    assert [m[3] for m in got.wait_for(300)] == [b"%d" % i for i in range(300)]
    [sfm_conn] = client.sfm_conns.values()
    assert (sfm_conn.writer.batches > 0) == (handoff == "true")
