"""A listener that refuses an sfm peer's handshake tells it why (the ``refusal`` extension),
on every driver, so the refused side can say more than "cannot reach"; a plain peer
(NVFlare's, which offers no extensions) just sees the connection close, as before."""

from __future__ import annotations

import pytest
from helpers import StateLog, wait_until

from sfm_core import ConnManager, Endpoint, HandshakeRefused, Mode
from sfm_core.pki import make_pki


@pytest.fixture
def managers():
    made: list[ConnManager] = []

    def make(name: str) -> ConnManager:
        manager = ConnManager(Endpoint(name), reconnect_max=0.5)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.stop()


def _refused(client: ConnManager, handle: str) -> HandshakeRefused:
    client.start()
    connector = client.get_connector(handle)
    wait_until(lambda: isinstance(connector.error, HandshakeRefused), what="the refusal reaching the client")
    return connector.error


@pytest.mark.parametrize("scheme", ["tcp", "ws", "http", "grpc"])
def test_a_client_claiming_the_listeners_name_is_told_why(managers, scheme: str) -> None:
    server = managers("server")
    states = StateLog()
    server.add_endpoint_monitor(states)
    handle = server.add_connector(f"{scheme}://127.0.0.1:0", {}, Mode.PASSIVE)
    server.start()
    url = server.wait_listening(handle)
    client = managers("server")
    error = _refused(client, client.add_connector(url, {}, Mode.ACTIVE))
    assert "refused our handshake" in error.message and "our own endpoint name 'server'" in error.message
    assert states.events == []  # the listener never recorded it


def test_a_certificate_for_another_name_is_told_why(managers, tmp_path) -> None:
    pki = make_pki(str(tmp_path), "server", "site-1")  # the client certificate is for site-1
    server = managers("server")
    handle = server.add_connector("stcp://127.0.0.1:0", dict(pki.server), Mode.PASSIVE)
    server.start()
    url = server.wait_listening(handle)
    client = managers("site-2")
    error = _refused(client, client.add_connector(url, dict(pki.client), Mode.ACTIVE))
    assert "'site-2'" in error.message and "'site-1'" in error.message
    assert server.find_endpoint("site-2") is None
