"""The public API of NVFlare's ConnManager that sfm keeps, name by name."""

from __future__ import annotations

import inspect

import pytest

import sfm_core
from sfm_core import conn_manager

SEED_METHODS = {
    "add_connector": ["driver", "params", "mode"],
    "add_endpoint_monitor": ["monitor"],
    "close_connection": ["connection"],
    "find_endpoint": ["name"],
    "get_connections": ["name"],
    "get_dict_payload": ["prefix", "frame"],
    "handle_new_connection": ["connection"],
    "loopback_message_task": ["endpoint", "app_id", "headers", "payload"],
    "notify_monitors": ["endpoint"],
    "process_frame": ["sfm_conn", "frame"],
    "process_frame_task": ["sfm_conn", "frame"],
    "register_message_receiver": ["app_id", "receiver"],
    "remove_connector": ["handle"],
    "remove_endpoint": ["name"],
    "send_loopback_message": ["endpoint", "app_id", "headers", "payload"],
    "send_message": ["endpoint", "app_id", "headers", "payload"],
    "start": [],
    "start_connector": ["connector"],
    "start_connector_task": ["connector"],
    "state_change": ["connection"],
    "stop": [],
    "update_endpoint": ["sfm_conn", "data"],
}


def _positional(fn: object) -> list[str]:
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.name != "self" and p.default is inspect.Parameter.empty]


@pytest.mark.parametrize("name", sorted(SEED_METHODS))
def test_conn_manager_has_every_seed_method_with_its_signature(name: str) -> None:
    method = getattr(sfm_core.ConnManager, name)
    assert _positional(method) == SEED_METHODS[name]


def test_static_methods_are_static() -> None:
    for name in ("get_dict_payload", "start_connector_task"):
        assert isinstance(inspect.getattr_static(sfm_core.ConnManager, name), staticmethod)


def test_conn_manager_is_a_conn_monitor_built_from_an_endpoint() -> None:
    assert issubclass(sfm_core.ConnManager, sfm_core.ConnMonitor)
    assert _positional(sfm_core.ConnManager.__init__) == ["local_endpoint"]


def test_null_connection_and_frame_receiver() -> None:
    null = sfm_core.NullConnection()
    assert isinstance(null, sfm_core.Connection)
    assert null.get_conn_properties() == {}
    null.close()
    with pytest.raises(sfm_core.CommError):
        null.send_frame(b"")
    assert issubclass(sfm_core.SfmFrameReceiver, sfm_core.FrameReceiver)
    assert _positional(sfm_core.SfmFrameReceiver.__init__) == ["conn_manager", "conn"]
    assert _positional(sfm_core.SfmFrameReceiver.process_frame) == ["frame"]
    assert conn_manager.get_handle() != conn_manager.get_handle()


def test_top_level_exports() -> None:
    from sfm_core import (  # noqa: F401
        CommError,
        Connection,
        ConnectorInfo,
        ConnManager,
        ConnMonitor,
        Driver,
        Endpoint,
        EndpointMonitor,
        EndpointState,
        FrameReceiver,
        Message,
        MessageReceiver,
        Mode,
    )


def test_driver_contract_methods() -> None:
    for name in (
        "supported_transports",
        "capabilities",
        "listen",
        "connect",
        "get_urls",
        "shutdown",
        "register_conn_monitor",
    ):
        assert callable(getattr(sfm_core.Driver, name))
    for name in ("send_frame", "close", "get_conn_properties", "register_frame_receiver", "process_frame"):
        assert callable(getattr(sfm_core.Connection, name))


def test_get_dict_payload_reads_a_handshake_map() -> None:
    from sfm_core.frames import PREFIX, FrameType, encode_frame
    from sfm_core.handshake import build_handshake

    frame = b"".join(encode_frame(FrameType.HELLO, 0, 1, {"h": 1}, build_handshake("site-1", {"p": 2})))

    class Prefix:
        header_len = PREFIX.unpack_from(frame)[1]

    data = sfm_core.ConnManager.get_dict_payload(Prefix, frame)
    assert data["endpoint_name"] == "site-1" and data["p"] == 2
