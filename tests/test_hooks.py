"""The hook surfaces of the three contracts (``sfm_core/hookspecs.py``): a plugin contributes
driver classes (Driver), admits or refuses a connection before its handshake completes
(Connection), and wraps a connection's frame receiver (FrameReceiver)."""

from __future__ import annotations

import logging
import threading

import pytest
from helpers import Collector, StateLog, wait_ready, wait_until

from sfm_core import ConnManager, Endpoint, HandshakeRefused, Mode, get_plugin_manager, hookimpl
from sfm_core.receivers import FrameReceiverWrapper
from sfm_core.registry import DriverRegistry

tcp_driver = pytest.importorskip("sfm_driver_tcp")


@pytest.fixture
def plugins():
    """``plugins(obj, name)`` registers a plugin for the test; all are unregistered after."""
    pm = get_plugin_manager()
    registered = []

    def register(obj: object, name: str) -> None:
        pm.register(obj, name=name)
        registered.append(obj)

    yield register
    for obj in registered:
        pm.unregister(obj)


@pytest.fixture
def managers():
    made: list[ConnManager] = []

    def make(name: str, **kwargs) -> ConnManager:
        manager = ConnManager(Endpoint(name), reconnect_max=0.5, **kwargs)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.stop()


def _listen(manager: ConnManager, url: str = "tcp://127.0.0.1:0") -> str:
    handle = manager.add_connector(url, {}, Mode.PASSIVE)
    manager.start()
    return manager.wait_listening(handle)


# -- Driver: sfm_driver_classes ------------------------------------------------------------


class Contributes:
    @hookimpl
    def sfm_driver_classes(self):
        return {"tcpx": tcp_driver.TcpDriver}


def test_a_plugin_contributes_a_driver_without_packaging_it(plugins, managers) -> None:
    registry = DriverRegistry("sfm.drivers.none-here")  # no entry points: only the plugin
    assert "tcpx" not in registry.schemes()
    plugins(Contributes(), "my-transports")  # registered after the registry was made
    assert "tcpx" in registry.schemes()
    [entry] = [e for e in registry.load_all() if e.scheme == "tcpx"]
    assert (entry.distribution, entry.status) == ("plugin:my-transports", "ok")
    assert "plugin:my-transports" in "\n".join(registry.explain("tcpx"))
    server = managers("server", registry=registry)
    url = _listen(server, "tcpx://127.0.0.1:0")
    client = managers("site-1")
    client.add_connector(url.replace("tcpx://", "tcp://"), {}, Mode.ACTIVE)
    client.start()
    wait_ready(server, "site-1")


def test_a_contributed_driver_can_be_denied_by_plugin_name(plugins, monkeypatch) -> None:
    plugins(Contributes(), "my-transports")
    monkeypatch.setenv("SFM_DRIVERS_DENY", "plugin:my-transports")
    registry = DriverRegistry("sfm.drivers.none-here")
    assert [e.status for e in registry.entries() if e.scheme == "tcpx"] == ["denied"]


def test_a_failing_contribution_is_logged_and_hides_nothing_else(plugins, caplog) -> None:
    class Broken:
        @hookimpl
        def sfm_driver_classes(self):
            raise RuntimeError("broken on purpose")

    plugins(Broken(), "broken")
    plugins(Contributes(), "my-transports")
    registry = DriverRegistry("sfm.drivers.none-here")
    with caplog.at_level(logging.WARNING, logger="sfm_core.registry"):
        assert registry.create_driver("tcpx") is not None
    assert any("plugin:broken" in r.getMessage() and "broken on purpose" in r.getMessage() for r in caplog.records)


# -- Connection: sfm_admit_connection --------------------------------------------------------


class AllowList:
    def __init__(self, allowed: set[str]) -> None:
        self.allowed = allowed
        self.asked: list[tuple[str, str]] = []

    @hookimpl
    def sfm_admit_connection(self, manager, connection, endpoint_name, conn_props):
        self.asked.append((manager.local_endpoint.name, endpoint_name))
        if manager.local_endpoint.name == "server" and endpoint_name not in self.allowed:
            return f"{endpoint_name!r} is not on the allow-list"
        return None


def test_a_plugin_refuses_a_peer_before_ready_and_the_peer_is_told(plugins, managers) -> None:
    policy = AllowList({"site-1"})
    plugins(policy, "allow-list")
    server = managers("server")
    states = StateLog()
    server.add_endpoint_monitor(states)
    url = _listen(server)
    good = managers("site-1")
    good.add_connector(url, {}, Mode.ACTIVE)
    good.start()
    wait_ready(server, "site-1")
    bad = managers("site-2")
    handle = bad.add_connector(url, {}, Mode.ACTIVE)
    bad.start()
    connector = bad.get_connector(handle)
    wait_until(lambda: isinstance(connector.error, HandshakeRefused), what="site-2 told it was refused")
    assert "'site-2' is not on the allow-list (plugin allow-list)" in connector.error.message
    assert [name for name, _ in states.events] == ["site-1"]  # monitors never heard of site-2
    assert ("site-1", "server") in policy.asked  # the connecting side asks too, on READY


def test_an_admission_plugin_that_raises_refuses_the_connection(plugins, managers, caplog) -> None:
    class Raises:
        @hookimpl
        def sfm_admit_connection(self, manager, connection, endpoint_name, conn_props):
            if manager.local_endpoint.name == "server":
                raise ValueError("policy store unreachable")

    plugins(Raises(), "flaky-policy")
    server = managers("server")
    url = _listen(server)
    client = managers("site-1")
    handle = client.add_connector(url, {}, Mode.ACTIVE)
    with caplog.at_level(logging.ERROR, logger="sfm_core.plugins"):
        client.start()
        connector = client.get_connector(handle)
        wait_until(lambda: isinstance(connector.error, HandshakeRefused), what="refused, failing closed")
    assert "admission check of plugin flaky-policy failed (ValueError)" in connector.error.message
    assert server.find_endpoint("site-1") is None


# -- FrameReceiver: sfm_wrap_frame_receiver --------------------------------------------------


class Counting(FrameReceiverWrapper):
    def __init__(self, inner, counts: dict, lock: threading.Lock) -> None:
        super().__init__(inner)
        self.counts, self.lock = counts, lock

    def process_frames(self, frames) -> None:
        with self.lock:
            self.counts["frames"] = self.counts.get("frames", 0) + len(frames)
        super().process_frames(frames)


class Metrics:
    def __init__(self) -> None:
        self.counts: dict = {}
        self.lock = threading.Lock()

    @hookimpl
    def sfm_wrap_frame_receiver(self, manager, connection, receiver):
        if manager.local_endpoint.name != "server":
            return None
        return Counting(receiver, self.counts, self.lock)


def test_a_plugin_wraps_the_frame_receiver_and_sees_every_frame(plugins, managers) -> None:
    metrics = Metrics()
    plugins(metrics, "metrics")
    server = managers("server")
    rx = Collector()
    server.register_message_receiver(7, rx)
    url = _listen(server)
    client = managers("site-1")
    client.add_connector(url, {}, Mode.ACTIVE)
    client.start()
    peer = wait_ready(client, "server")
    for i in range(100):
        client.send_message(peer, 7, {"i": i}, b"x")
    messages = rx.wait_for(100)
    assert [m[2]["i"] for m in messages] == list(range(100))  # in order, each once
    with metrics.lock:
        assert metrics.counts["frames"] >= 101  # the HELLO and every DATA frame


def test_a_wrapper_that_overrides_only_process_frame_still_sees_every_frame(plugins, managers) -> None:
    seen: list[int] = []

    class OneByOne(FrameReceiverWrapper):
        def process_frame(self, frame) -> None:
            seen.append(len(frame))
            super().process_frame(frame)

    class Plugin:
        @hookimpl
        def sfm_wrap_frame_receiver(self, manager, connection, receiver):
            return OneByOne(receiver) if manager.local_endpoint.name == "server" else None

    plugins(Plugin(), "one-by-one")
    server = managers("server")
    rx = Collector()
    server.register_message_receiver(7, rx)
    url = _listen(server)
    client = managers("site-1")
    client.add_connector(url, {}, Mode.ACTIVE)
    client.start()
    peer = wait_ready(client, "server")
    for _ in range(50):
        client.send_message(peer, 7, None, b"y" * 10)
    rx.wait_for(50)
    assert len(seen) >= 51
