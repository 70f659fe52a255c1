"""Operator configuration files: a good one runs, every mistake is named with its key and line."""

from __future__ import annotations

import inspect
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import Collector, scaled, wait_ready

from sfm_core import CommError, ConnManager, Endpoint, Mode
from sfm_core.config import MANAGER_KEYS, ConfigError, MaskingFilter, check_config, load_config, mask

GOOD = """
[endpoint]
name = "cfg-server"
properties = { org = "a", tier = 2 }

[manager]
heartbeat_interval = 30
dead_after = 4
handshake_timeout = 7.5
linger = 1
max_frame_size = 1048576

[drivers]
prefer = { tcp = "sfm-driver-tcp" }
required_drivers = ["tcp", "sfm-driver-tcp"]

[[connector]]
url = "tcp://127.0.0.1:0"
mode = "passive"
params = { send_timeout = 5, max_connections = 10, max_handshakes = 2 }
"""

HEAD = '[endpoint]\nname = "a"\n'
LISTENER = '[[connector]]\nurl = "tcp://127.0.0.1:0"\nmode = "passive"\n'


def write(tmp_path: Path, text: str, name: str = "sfm.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    config, found = check_config(write(tmp_path, text), environ={})
    assert config is None and found, "expected problems"
    return [str(p) for p in found]


def only(tmp_path: Path, text: str) -> str:
    found = problems(tmp_path, text)
    assert len(found) == 1, found
    return found[0]


def test_a_config_builds_the_endpoint_it_describes(tmp_path: Path) -> None:
    manager = ConnManager.from_config(write(tmp_path, GOOD), environ={})
    [handle] = list(manager.connectors)
    got = Collector()
    manager.register_message_receiver(1, got)
    client = ConnManager(Endpoint("site-1"))
    try:
        manager.start()
        url = manager.wait_listening(handle, scaled(10))
        assert manager.max_frame_size == 1048576 and manager.heartbeat_interval == 30
        assert (
            manager.liveness.dead_timeout == 120 and manager.liveness.handshake_timeout == 7.5 and manager.linger == 1
        )
        params = manager.get_connector(handle).params
        assert params["send_timeout"] == 5 and params["max_connections"] == 10
        client.add_connector(url, {}, Mode.ACTIVE)
        client.start()
        server = wait_ready(client, "cfg-server")
        assert server.properties["org"] == "a" and server.properties["tier"] == 2
        client.send_message(server, 1, None, b"configured")
        assert got.wait_for(1)[0][3] == b"configured"
    finally:
        client.stop()
        manager.stop()


def test_from_config_takes_a_mapping() -> None:
    manager = ConnManager.from_config(
        {"endpoint": {"name": "m"}, "connector": [{"url": "tcp://127.0.0.1:0", "mode": "passive"}]}, environ={}
    )
    try:
        assert manager.local_endpoint.name == "m" and len(manager.connectors) == 1
    finally:
        manager.stop()


def test_the_manager_keys_are_the_conn_manager_options() -> None:
    options = {
        n
        for n, p in inspect.signature(ConnManager.__init__).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and n != "registry"
    }
    assert {k.name for k in MANAGER_KEYS} == options


# -- each kind of error ------------------------------------------------------------------


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    assert only(tmp_path, '[endpoint]\nname = "a"\nname =\n').startswith(f"{tmp_path / 'sfm.toml'}:3: not valid TOML")


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read: No such file"):
        load_config(tmp_path / "nope.toml", environ={})


def test_an_unknown_section_says_did_you_mean(tmp_path: Path) -> None:
    got = only(tmp_path, HEAD + "[manger]\nlinger = 1\n" + LISTENER)
    assert ":3: manger: unknown section" in got and "did you mean 'manager'?" in got


def test_an_unknown_key_says_did_you_mean(tmp_path: Path) -> None:
    got = only(tmp_path, HEAD + "[manager]\nheartbeat_intervall = 3\n" + LISTENER)
    assert ":4: manager.heartbeat_intervall: unknown key" in got and "did you mean 'heartbeat_interval'?" in got


def test_an_unknown_connector_key_says_did_you_mean(tmp_path: Path) -> None:
    got = only(tmp_path, HEAD + LISTENER + "parms = { send_timeout = 1 }\n")
    assert ":6: connector[0].parms: unknown key" in got and "did you mean 'params'?" in got


def test_a_misspelt_driver_parameter_in_params_is_refused(tmp_path: Path) -> None:
    text = HEAD + '[[connector]]\nurl = "tcp://host:8002"\nmode = "active"\n[connector.params]\nconect_timeout = 5\n'
    got = only(tmp_path, text)
    assert ":7: connector[0].params.conect_timeout:" in got and "did you mean 'connect_timeout'?" in got


def test_a_misspelt_driver_parameter_in_the_url_is_refused(tmp_path: Path) -> None:
    got = only(tmp_path, HEAD + '[[connector]]\nurl = "ws://0:8002?send_timout=1"\nmode = "passive"\n')
    assert ":4: connector[0].url:" in got and "did you mean 'send_timeout'?" in got


def test_a_wrong_type_names_what_was_expected_and_found(tmp_path: Path) -> None:
    got = only(tmp_path, HEAD + '[manager]\nlinger = "soon"\n' + LISTENER)
    assert ":4: manager.linger: expected a number >= 0, found string 'soon'" in got


def test_a_bad_driver_parameter_value_names_what_was_expected(tmp_path: Path) -> None:
    got = only(tmp_path, HEAD + LISTENER + 'params = { send_timeout = "soon" }\n')
    assert ":6: connector[0].params.send_timeout:" in got and "expected a finite float" in got


def test_an_out_of_range_value_is_refused(tmp_path: Path) -> None:
    got = only(tmp_path, HEAD + "[manager]\ndead_after = 0\n" + LISTENER)
    assert "manager.dead_after: out of range: expected an integer >= 1, found integer 0" in got


def test_an_unknown_scheme_names_the_package_to_install(tmp_path: Path) -> None:
    # Deny the official distribution: grpc is then unknown here whatever is installed.
    text = HEAD + '[drivers]\ndeny = ["sfm-driver-grpc"]\n[[connector]]\nurl = "grpc://0:1"\nmode = "passive"\n'
    got = only(tmp_path, text)
    assert "connector[0].url:" in got and "sfm-driver-grpc" in got


def test_a_misspelt_scheme_says_did_you_mean(tmp_path: Path) -> None:
    got = only(tmp_path, HEAD + '[[connector]]\nurl = "tcpp://0:1"\nmode = "passive"\n')
    assert ":4: connector[0].url: no driver for scheme 'tcpp'" in got and "did you mean" in got


def test_an_unreadable_certificate_file_is_named(tmp_path: Path) -> None:
    text = (
        HEAD
        + '[[connector]]\nurl = "stcp://0:1"\nmode = "passive"\n'
        + '[connector.tls]\nca_cert = "ca.pem"\nserver_cert = "/nowhere/server.crt"\nserver_key = "k.pem"\n'
    )
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    (tmp_path / "k.pem").chmod(0)
    found = problems(tmp_path, text)
    assert any(
        ":8: connector[0].tls.server_cert: expected a readable PEM file, found '/nowhere/server.crt'" in p
        for p in found
    )
    if not any("k.pem" in p for p in found):  # root reads anything
        assert len(found) == 1, found
    else:
        assert any(":9: connector[0].tls.server_key:" in p and "Permission denied" in p for p in found)


def test_a_bad_certificate_is_reported_by_the_tls_settings(tmp_path: Path) -> None:
    for name in ("ca.pem", "s.crt", "s.key"):
        (tmp_path / name).write_text("not a certificate")
    text = HEAD + '[[connector]]\nurl = "stcp://0:1"\nmode = "passive"\n'
    text += 'tls = { ca_cert = "ca.pem", server_cert = "s.crt", server_key = "s.key" }\n'
    got = only(tmp_path, text)
    assert "connector[0].tls.server_cert:" in got and "do not make a certificate and its key" in got


def test_a_port_out_of_range_is_refused(tmp_path: Path) -> None:
    got = only(tmp_path, HEAD + '[[connector]]\nurl = "tcp://0:70000"\nmode = "passive"\n')
    assert ":4: connector[0].url: port out of range: expected 0..65535, found '70000'" in got


def test_a_port_param_out_of_range_is_refused(tmp_path: Path) -> None:
    got = only(tmp_path, HEAD + LISTENER + "params = { port = 65536 }\n")
    assert "connector[0].params.port:" in got and "0..65535" in got


def test_a_url_without_a_port_and_an_active_port_0_are_refused(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        HEAD + '[[connector]]\nurl = "tcp://localhost"\nmode = "passive"\n'
        '[[connector]]\nurl = "tcp://localhost:0"\nmode = "active"\n',
    )
    assert "connector[0].url: expected a port in the URL" in found[0]
    assert "connector[1].url: expected the port the peer listens on, found port 0" in found[1]


def test_a_bad_mode_and_a_missing_url(tmp_path: Path) -> None:
    found = problems(
        tmp_path, HEAD + '[[connector]]\nurl = "tcp://0:1"\nmode = "listen"\n[[connector]]\nmode = "active"\n'
    )
    assert ":5: connector[0].mode: expected one of 'passive', 'active', found string 'listen'" in found[0]
    assert ":6: connector[1]: missing 'url'" in found[1]


def test_no_name_and_no_connector(tmp_path: Path) -> None:
    found = problems(tmp_path, "[endpoint]\n")
    assert any(":1: endpoint: missing 'name'" in p for p in found)
    assert any("no [[connector]]" in p for p in found)


def test_an_invalid_endpoint_name(tmp_path: Path) -> None:
    assert "endpoint.name: invalid endpoint name 'a b'" in only(tmp_path, '[endpoint]\nname = "a b"\n' + LISTENER)


def test_a_date_in_properties_cannot_be_sent(tmp_path: Path) -> None:
    got = only(tmp_path, '[endpoint]\nname = "a"\nproperties = { since = 2024-01-01 }\n' + LISTENER)
    assert "endpoint.properties.since: expected a string" in got and "found a date/time 2024-01-01" in got


def test_required_drivers_that_are_missing_fail_the_start_listing_each(tmp_path: Path) -> None:
    text = HEAD + '[drivers]\nrequired_drivers = ["tcp", "quic", "sfm-driver-nope"]\n' + LISTENER
    with pytest.raises(ConfigError) as err:
        ConnManager.from_config(write(tmp_path, text), environ={})
    assert err.value.code == CommError.BAD_CONFIG
    [message] = err.value.errors
    assert ":4: drivers.required_drivers: not usable: quic (no driver for scheme 'quic'" in message
    assert "sfm-driver-nope (not installed: pip install sfm-driver-nope)" in message
    assert "tcp (" not in message


def test_a_pin_to_a_distribution_that_does_not_serve_the_scheme(tmp_path: Path) -> None:
    got = only(tmp_path, HEAD + '[drivers]\nprefer = { tcp = "sfm-driver-grpc" }\n' + LISTENER)
    assert (
        "drivers.prefer.tcp: expected a distribution that serves 'tcp' (sfm-driver-tcp), found 'sfm-driver-grpc'" in got
    )


def test_the_shorthand_pin_is_a_prefer(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, HEAD + '[drivers]\ntcp = "sfm-driver-tcp"\n' + LISTENER), environ={})
    assert config.drivers["prefer"] == {"tcp": "sfm-driver-tcp"}


def test_an_allow_list_without_the_driver_refuses_its_scheme(tmp_path: Path) -> None:
    got = only(tmp_path, HEAD + '[drivers]\nallow = ["sfm-driver-websocket"]\n' + LISTENER)
    assert "connector[0].url: no permitted driver for scheme 'tcp'" in got and "allow list" in got


def test_the_drivers_selection_leaves_the_process_registry_alone(tmp_path: Path) -> None:
    load_config(write(tmp_path, HEAD + '[drivers]\ndeny = ["sfm-driver-grpc"]\n' + LISTENER), environ={})
    manager = ConnManager(Endpoint("other"))
    try:
        manager.add_connector("grpc://127.0.0.1:0", {}, Mode.PASSIVE)
    finally:
        manager.stop()


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    text = """
[endpoint]
name = "srv"
propertes = { a = 1 }

[manager]
heartbeat_intervl = 3
linger = "soon"

[drivers]
required_drivers = ["quic"]

[[connector]]
url = "tcp://user:secret@0:70000"
mode = "passive"

[[connector]]
url = "tcp://host:8002?send_timout=1"
mode = "active"
params = { conect_timeout = 5 }

[[connector]]
url = "stcp://0:8003"
mode = "listen"

[[connector]]
url = "stcp://0:8004"
mode = "passive"
tls = { ca_cert = "/nowhere/ca.pem", server_cert = "/nowhere/s.crt", server_key = "/nowhere/s.key" }
"""
    found = problems(tmp_path, text)
    expected = [
        ":4: endpoint.propertes: unknown key",
        ":7: manager.heartbeat_intervl: unknown key",
        ":8: manager.linger: expected a number",
        ":11: drivers.required_drivers: not usable: quic",
        ":14: connector[0].url: port out of range",
        ":18: connector[1].url: TcpDriver (tcp://): unknown parameter 'send_timout'",
        ":20: connector[1].params.conect_timeout:",
        ":24: connector[2].mode: expected one of",
        ":29: connector[3].tls.ca_cert: expected a readable PEM file",
        ":29: connector[3].tls.server_cert: expected a readable PEM file",
        ":29: connector[3].tls.server_key: expected a readable PEM file",
    ]
    assert len(found) == len(expected), found
    for want, got in zip(expected, found, strict=True):
        assert want in got
    assert not any("secret" in p for p in found)
    # The same list is what ConnManager.from_config raises.
    with pytest.raises(ConfigError) as err:
        ConnManager.from_config(tmp_path / "sfm.toml", environ={})
    assert err.value.errors == found and f"{len(found)} errors" in err.value.message


# -- secrets -------------------------------------------------------------------------------


def test_mask_hides_url_passwords_and_pem_contents() -> None:
    assert (
        mask("at tcp://user:secret@host:1 and ws://u:p%40ss@h:2/x") == "at tcp://user:***@host:1 and ws://u:***@h:2/x"
    )
    assert mask("tcp://user@host:1") == "tcp://user@host:1"
    pem = "-----BEGIN PRIVATE KEY-----\nMIIEv\n-----END PRIVATE KEY-----"
    assert "MIIEv" not in mask(f"key {pem} here")


def test_the_masking_filter_masks_a_records_traceback_too() -> None:
    import sys

    try:
        raise CommError(CommError.CLOSED, "cannot connect to tcp://u:secret@h:1")
    except CommError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert MaskingFilter().filter(record)
    text = logging.Formatter().format(record)
    assert "tcp://u:***@h:1" in text and "secret" not in text


def test_a_traceback_another_handler_formatted_first_is_masked_too() -> None:
    import sys

    try:
        raise CommError(CommError.CLOSED, "cannot connect to tcp://u:secret@h:1")
    except CommError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    logging.Formatter().format(record)  # an earlier handler: exc_text is the raw traceback now
    assert MaskingFilter().filter(record)
    assert "secret" not in logging.Formatter().format(record)


def test_command_output_masks_url_passwords_and_nothing_else(capsys) -> None:
    from sfm_core.cli import _out

    cert = "-----BEGIN CERTIFICATE-----\nMIIB"  # a peer's property, cut short: printed as it is
    _out(f'{{"url": "tcp://u:secret@h:1", "cert": "{cert}"}}')
    assert capsys.readouterr().out == f'{{"url": "tcp://u:***@h:1", "cert": "{cert}"}}\n'


def test_key_contents_where_a_path_belongs_are_never_shown(tmp_path: Path) -> None:
    text = HEAD + '[[connector]]\nurl = "stcp://0:1"\nmode = "passive"\n'
    text += 'tls = { server_key = """-----BEGIN PRIVATE KEY-----\nMIIEvSECRET\n-----END PRIVATE KEY-----""" }\n'
    found = problems(tmp_path, text)
    assert any("connector[0].tls.server_key: expected the path of a PEM file, found PEM contents" in p for p in found)
    assert not any("MIIEvSECRET" in p for p in found)


def test_passwords_never_reach_the_log_or_the_output_of_serve(tmp_path: Path) -> None:
    # Nothing listens on port 1: the connector logs each failed attempt (-vv), with its URL.
    path = write(tmp_path, HEAD + '[[connector]]\nurl = "tcp://user:secret@127.0.0.1:1"\nmode = "active"\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "sfm_core.cli", "serve", "--config", str(path), "-vv"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(scaled(2))
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=scaled(20))
    assert proc.returncode == 0, err
    assert "connecting to tcp://user:***@127.0.0.1:1" in err
    assert "secret" not in out + err


def test_config_errors_mask_passwords(tmp_path: Path) -> None:
    text = HEAD + '[[connector]]\nurl = "tcp://user:secret@h:99999"\nmode = "active"\n'
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), environ={})
    assert "secret" not in err.value.message and "tcp://user:***@h:99999" in err.value.message
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "connector %s: %s", ("tcp://u:secret@h:1", "e"), None)
    assert MaskingFilter().filter(record) and record.getMessage() == "connector tcp://u:***@h:1: e"


def test_serve_with_a_bad_config_exits_2_with_every_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[endpoint]\nname = "a"\n[manager]\nlingr = 1\n')
    out = subprocess.run(
        [sys.executable, "-m", "sfm_core.cli", "serve", "--config", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "manager.lingr: unknown key" in out.stderr and "no [[connector]]" in out.stderr


def test_a_transport_without_ports_needs_none(tmp_path: Path) -> None:
    from sfm_core.driver import Driver
    from sfm_core.registry import DriverRegistry

    class PathDriver(Driver):
        SFM_DRIVER_CONTRACT = 1

        @staticmethod
        def supported_transports() -> list[str]:
            return ["pathx"]

        @staticmethod
        def capabilities() -> dict:
            return {"listen_url": "{scheme}://{tmpdir}/sfm.sock"}

        def listen(self, connector) -> None:  # pragma: no cover - never started
            pass

        def connect(self, connector) -> None:  # pragma: no cover - never started
            pass

    registry = DriverRegistry()
    registry.register("pathx", PathDriver)
    text = HEAD + f'[[connector]]\nurl = "pathx://{tmp_path}/s.sock"\nmode = "passive"\n'
    config, found = check_config(write(tmp_path, text), environ={}, registry=registry)
    assert not found and config is not None
