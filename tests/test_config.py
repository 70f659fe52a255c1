"""Operator configuration files: a good one runs, every mistake is named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import Collector, scaled, wait_ready

from sfm_core import CommError, ConnManager, Endpoint, Mode
from sfm_core.config import load_config

GOOD = """
[endpoint]
name = "cfg-server"
properties = { org = "a", tier = 2 }

[manager]
heartbeat_interval = 30
max_frame_size = 1048576

[drivers]
tcp = "sfm-driver-tcp"

[[connector]]
url = "tcp://127.0.0.1:0"
mode = "passive"
params = { send_timeout = 5 }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sfm.toml"
    path.write_text(text)
    return path


def test_a_config_builds_the_endpoint_it_describes(tmp_path: Path) -> None:
    manager, [handle] = load_config(write(tmp_path, GOOD)).build()
    got = Collector()
    manager.register_message_receiver(1, got)
    client = ConnManager(Endpoint("site-1"))
    try:
        manager.start()
        url = manager.wait_listening(handle, scaled(10))
        assert manager.max_frame_size == 1048576 and manager.heartbeat_interval == 30
        assert manager.get_connector(handle).params["send_timeout"] == 5
        client.add_connector(url, {}, Mode.ACTIVE)
        client.start()
        server = wait_ready(client, "cfg-server")
        assert server.properties["org"] == "a" and server.properties["tier"] == 2
        client.send_message(server, 1, None, b"configured")
        assert got.wait_for(1)[0][3] == b"configured"
    finally:
        client.stop()
        manager.stop()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[endpoint\nname=", "not valid TOML"),
        ('[endpoint]\nname = "a"\n[extra]\n', "unknown section(s) ['extra']"),
        ('[[connector]]\nurl = "tcp://0:1"\nmode = "passive"\n', "[endpoint] needs a name"),
        ('[endpoint]\nname = "a"\n', "no [[connector]]"),
        ('[endpoint]\nname = "a"\n[[connector]]\nurl = "tcp://0:1"\nmode = "listen"\n', "connector 1: mode must be"),
        ('[endpoint]\nname = "a"\n[[connector]]\nurl = "localhost"\nmode = "active"\n', "connector 1: url must be"),
        (
            '[endpoint]\nname = "a"\n[[connector]]\nurl = "tcp://0:1"\nmode = "active"\nport = 3\n',
            "unknown key(s) ['port']",
        ),
        (
            '[endpoint]\nname = "a"\n[manager]\nheartbeat = 3\n[[connector]]\nurl = "tcp://0:1"\nmode = "active"\n',
            "[manager]: unknown option(s) ['heartbeat']",
        ),
    ],
)
def test_every_mistake_is_named(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(CommError) as err:
        load_config(path)
    assert err.value.code == CommError.BAD_CONFIG
    assert str(path) in str(err.value) and message in str(err.value)


def test_an_unknown_scheme_in_a_config_names_it(tmp_path: Path) -> None:
    text = GOOD.replace("tcp://127.0.0.1:0", "quic://127.0.0.1:0")
    with pytest.raises(CommError, match="no driver for scheme 'quic'"):
        load_config(write(tmp_path, text)).build()


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(CommError, match="nope.toml: cannot read"):
        load_config(tmp_path / "nope.toml")


def test_serve_with_a_bad_config_exits_with_the_reason(tmp_path: Path) -> None:
    path = write(tmp_path, '[endpoint]\nname = "a"\n')
    out = subprocess.run(
        [sys.executable, "-m", "sfm_core.cli", "serve", "--config", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "no [[connector]]" in out.stderr
