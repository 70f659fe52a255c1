"""The WebSocket driver listening on every interface (``ws://0:0``): one port for every family.

A listener on host ``0`` binds IPv4 and IPv6; with port 0 both must get the same port, or the
reported URL (``ws://127.0.0.1:PORT``) names a port that only one of them listens on.
"""

from __future__ import annotations

import socket

import pytest
from helpers import wait_ready

from sfm_core import ConnManager, Endpoint, Mode

pytest.importorskip("sfm_driver_websocket")

ROUNDS = 20


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


HAVE_IPV6 = _ipv6_loopback()


@pytest.mark.parametrize("scheme", ["ws", "http"])
def test_every_family_listens_on_the_reported_port(scheme: str) -> None:
    for _ in range(ROUNDS):
        server = ConnManager(Endpoint("server"))
        clients: list[ConnManager] = []
        try:
            handle = server.add_connector(f"{scheme}://0:0", {}, Mode.PASSIVE)
            server.start()
            url = server.wait_listening(handle)
            port = int(url.rsplit(":", 1)[1])
            targets = {"by-url": url, "by-v4": f"{scheme}://127.0.0.1:{port}"}
            if HAVE_IPV6:
                targets["by-v6"] = f"{scheme}://[::1]:{port}"
            for name, target in targets.items():
                client = ConnManager(Endpoint(name))
                clients.append(client)
                client.add_connector(target, {}, Mode.ACTIVE)
                client.start()
            for name in targets:
                wait_ready(server, name, 10)
        finally:
            for client in clients:
                client.stop()
            server.stop()


def test_an_ipv6_only_address_still_listens() -> None:
    if not HAVE_IPV6:
        pytest.skip("no IPv6 loopback")
    server = ConnManager(Endpoint("server"))
    client = ConnManager(Endpoint("site"))
    try:
        handle = server.add_connector("ws://[::1]:0", {}, Mode.PASSIVE)
        server.start()
        url = server.wait_listening(handle)
        assert url.startswith("ws://[::1]:")
        client.add_connector(url, {}, Mode.ACTIVE)
        client.start()
        wait_ready(server, "site", 10)
    finally:
        client.stop()
        server.stop()


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_a_host_without_ipv6_sockets_still_listens_on_ipv4(scheme: str, monkeypatch, tmp_path) -> None:
    """As asyncio's create_server: a family whose socket() fails (a kernel with IPv6 off) is
    skipped, not the whole listener (review finding)."""
    real = socket.socket

    class NoIPv6(real):  # type: ignore[misc, valid-type]
        def __init__(self, family=socket.AF_INET, *args, **kwargs) -> None:
            if family == socket.AF_INET6:
                raise OSError(97, "Address family not supported by protocol")
            super().__init__(family, *args, **kwargs)

    params: dict = {}
    client_params: dict = {}
    if scheme == "wss":
        from sfm_core.pki import make_pki

        pki = make_pki(str(tmp_path), "server", "site-1")
        params, client_params = dict(pki.server), dict(pki.client)
    server = ConnManager(Endpoint("server"))
    client = ConnManager(Endpoint("site-1"))
    try:
        monkeypatch.setattr(socket, "socket", NoIPv6)
        handle = server.add_connector(f"{scheme}://0:0", params, Mode.PASSIVE)
        server.start()
        url = server.wait_listening(handle)
        monkeypatch.setattr(socket, "socket", real)
        client.add_connector(url, client_params, Mode.ACTIVE)
        client.start()
        wait_ready(server, "site-1", 10)
    finally:
        monkeypatch.setattr(socket, "socket", real)
        client.stop()
        server.stop()
