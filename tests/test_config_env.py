"""Environment overrides (SFM_<SECTION>__<KEY>) and how `sfm serve` combines --config with
a URL, --name and --heartbeat: the file, then the environment, then the command line."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import scaled

from sfm_core import ConnManager
from sfm_core.cli import main
from sfm_core.config import ConfigError, check_config, load_config

BASE = """
[endpoint]
name = "site-1"
properties = { org = "a" }

[manager]
heartbeat_interval = 30

[[connector]]
url = "tcp://127.0.0.1:0"
mode = "passive"
"""


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "sfm.toml"
    path.write_text(BASE)
    return path


def test_environment_variables_override_single_keys(base: Path) -> None:
    env = {
        "SFM_ENDPOINT__NAME": "site-2",  # a string key: the text as it is
        "SFM_ENDPOINT__PROPERTIES__TIER": "2",  # TOML: an integer
        "SFM_ENDPOINT__PROPERTIES__ORG": '"b"',  # TOML: a quoted string
        "SFM_MANAGER__HEARTBEAT_INTERVAL": "2.5",
        "SFM_MANAGER__LINGER": "0",
        "SFM_CONNECTOR__0__PARAMS__SEND_TIMEOUT": "7",
        "SFM_CONNECTOR__1__URL": "tcp://server.example:8002",  # the next index adds a connector
        "SFM_CONNECTOR__1__MODE": "active",
        "SFM_DRIVERS__DENY": '["sfm-driver-grpc"]',
        "SFM_DRIVERS_ALLOW": "",  # the registry's own variables are not overrides
        "PATH": "/bin",
    }
    config = load_config(base, environ=env)
    assert config.name == "site-2" and config.properties == {"org": "b", "tier": 2}
    assert config.manager == {"heartbeat_interval": 2.5, "linger": 0}
    assert config.connectors[0].params == {"send_timeout": 7}
    assert [c.url for c in config.connectors] == ["tcp://127.0.0.1:0", "tcp://server.example:8002"]
    assert config.drivers["deny"] == ["sfm-driver-grpc"]


def test_os_environ_is_the_default(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SFM_ENDPOINT__NAME", "from-env")
    manager = ConnManager.from_config(base)
    try:
        assert manager.local_endpoint.name == "from-env"
    finally:
        manager.stop()


def test_a_bad_override_names_the_variable(base: Path) -> None:
    env = {
        "SFM_MANAGER__HEARTBEAT_INTERVAL": "soon",
        "SFM_MANAGER__LINGR": "1",
        "SFM_MANGER__LINGER": "1",
        "SFM_CONNECTOR__5__URL": "tcp://h:1",
        "SFM_CONNECTOR__X__URL": "tcp://h:1",
        "SFM_CONNECTOR__0__PARAMS__SEND_TIMOUT": "1",
    }
    _, found = check_config(base, environ=env)
    text = [str(p) for p in found]
    assert len(text) == 6, text
    for want in (
        "environment SFM_MANAGER__HEARTBEAT_INTERVAL: manager.heartbeat_interval: expected a number > 0, "
        "found string 'soon'",
        "environment SFM_MANAGER__LINGR: manager.lingr: unknown key",
        "environment SFM_MANGER__LINGER: not a configuration override",
        "environment SFM_CONNECTOR__5__URL: connector[5]: no connector 5: there are 1",
        "environment SFM_CONNECTOR__X__URL: connector: expected SFM_CONNECTOR__<INDEX>__<KEY>",
        "environment SFM_CONNECTOR__0__PARAMS__SEND_TIMOUT: connector[0].params.send_timout:",
    ):
        assert any(want in t for t in text), (want, text)
    assert any("did you mean 'linger'?" in t for t in text) and any("did you mean 'MANAGER'?" in t for t in text)


def test_check_reports_the_environment_unless_told_not_to(base: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SFM_MANAGER__LINGER", "-1")
    assert main(["config", "check", str(base)]) == 2
    assert "environment SFM_MANAGER__LINGER: manager.linger: out of range" in capsys.readouterr().err
    assert main(["config", "check", "--no-env", str(base)]) == 0


# -- sfm serve: file < environment < command line ------------------------------------------


def serve(argv: list[str], env: dict | None = None, seconds: float = 1.5) -> tuple[int, str, str]:
    import os

    proc = subprocess.Popen(
        [sys.executable, "-m", "sfm_core.cli", "serve", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        out, err = proc.communicate(timeout=scaled(seconds))
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=scaled(20))
    return proc.returncode, out, err


def test_serve_merges_the_command_line_over_the_file(base: Path) -> None:
    # --name wins over the environment, which wins over the file; the URL is one more connector.
    rc, out, err = serve(
        ["--config", str(base), "tcp://127.0.0.1:0", "--name", "cli-name", "--heartbeat", "3"],
        env={"SFM_ENDPOINT__NAME": "env-name"},
        seconds=3,
    )
    assert rc == 0, err
    lines = [line for line in out.splitlines() if "listening on" in line]
    assert len(lines) == 2 and all(line.startswith("cli-name listening on tcp://127.0.0.1:") for line in lines)


def test_serve_uses_the_environment_over_the_file(base: Path) -> None:
    rc, out, err = serve(["--config", str(base)], env={"SFM_ENDPOINT__NAME": "env-name"}, seconds=2)
    assert rc == 0, err
    assert out.startswith("env-name listening on tcp://127.0.0.1:")


def test_a_bad_command_line_value_is_named_as_such(base: Path, capsys) -> None:
    assert main(["serve", "--config", str(base), "--name", "bad name"]) == 2
    assert "--name: endpoint.name: invalid endpoint name 'bad name'" in capsys.readouterr().err
    assert main(["serve", "--config", str(base), "tcp://localhost"]) == 2
    assert "command line URL: connector[1].url: expected a port in the URL" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--connect"], ["--ca-cert", "ca.pem"], ["--connection-security", "tls"]])
def test_serve_refuses_connector_options_without_a_url(base: Path, flags: list[str], capsys) -> None:
    assert main(["serve", "--config", str(base), *flags]) == 2
    err = capsys.readouterr().err
    assert f"{flags[0]} with --config but no URL" in err and "[connector.tls]" in err


def test_serve_with_config_and_a_url_of_a_config_without_connectors(tmp_path: Path) -> None:
    path = tmp_path / "base.toml"
    path.write_text('[endpoint]\nname = "bare"\n')
    with pytest.raises(ConfigError, match="no \\[\\[connector\\]\\]"):
        load_config(path, environ={})
    rc, out, err = serve(["--config", str(path), "tcp://127.0.0.1:0"], seconds=2)
    assert rc == 0, err
    assert out.startswith("bare listening on tcp://127.0.0.1:")
    time.sleep(0)
