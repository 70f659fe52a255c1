"""A server config and a client config that talk to each other over each installed driver:
two TOML files per scheme, both started with ConnManager.from_config, a message each way."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import Collector, scaled, wait_ready

from sfm_core import ConnManager
from sfm_core.pki import make_pki
from sfm_core.registry import get_registry
from sfm_core.tls import SECURE_SCHEMES

SCHEMES = ("tcp", "stcp", "ws", "wss", "http", "https", "grpc", "grpcs")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("trustme")
    return make_pki(str(tmp_path_factory.mktemp("pki")), "cfg-server", "cfg-client")


def tls_table(files: dict[str, str]) -> str:
    return "[connector.tls]\n" + "".join(f'{k} = "{v}"\n' for k, v in files.items())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_server_and_a_client_config_talk(scheme: str, pki, tmp_path: Path) -> None:
    if scheme not in get_registry().schemes():
        pytest.skip(f"no driver installed for {scheme}")
    secure = scheme in SECURE_SCHEMES
    server_toml = tmp_path / "server.toml"
    server_toml.write_text(
        f"""
[endpoint]
name = "cfg-server"
properties = {{ role = "server" }}

[manager]
heartbeat_interval = 5
linger = 1

[drivers]
required_drivers = ["{scheme}"]

[[connector]]
url = "{scheme}://127.0.0.1:0"
mode = "passive"
params = {{ max_connections = 8 }}
"""
        + (tls_table(pki.server) if secure else "")
    )
    server = ConnManager.from_config(server_toml, environ={})
    client = None
    got_server, got_client = Collector(), Collector()
    server.register_message_receiver(7, got_server)
    try:
        server.start()
        url = server.wait_listening(next(iter(server.connectors)), scaled(10))
        client_toml = tmp_path / "client.toml"
        client_toml.write_text(
            f"""
[endpoint]
name = "cfg-client"

[manager]
handshake_timeout = 5
reconnect_min = 0.05

[[connector]]
url = "{url}"
mode = "active"
"""
            + (tls_table(pki.client) if secure else "")
        )
        client = ConnManager.from_config(client_toml, environ={})
        client.register_message_receiver(7, got_client)
        client.start()
        peer = wait_ready(client, "cfg-server", scaled(10))
        assert peer.properties["role"] == "server"
        client.send_message(peer, 7, {"n": 1}, b"up")
        assert got_server.wait_for(1)[0][2:4] == ({"n": 1}, b"up")
        server.send_message(wait_ready(server, "cfg-client", scaled(10)), 7, None, b"down")
        assert got_client.wait_for(1)[0][3] == b"down"
    finally:
        if client is not None:
            client.stop()
        server.stop()
