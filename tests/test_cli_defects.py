"""Defects of the ``sfm`` command found by trying it as a new user; each test failed before its fix."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest
from helpers import scaled, serving

from sfm_core import __version__
from sfm_core.cli import build_parser, main

SFM = [sys.executable, "-m", "sfm_core.cli"]


def run(
    *args: str, timeout: float = 60, env: dict | None = None, cmd: list | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run([*(cmd or SFM), *args], capture_output=True, text=True, timeout=scaled(timeout), env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- 1. a config error in a URL fails at once with exit 2 ----------------------------------


@pytest.mark.parametrize(
    ("url", "what"),
    [
        ("tcp://localhost", "no port"),
        ("tcp://127.0.0.1:0", "port 0"),
        ("tcp://127.0.0.1:9?send_timeout=soon", "send_timeout='soon'"),
        ("nosuch://127.0.0.1:9", "no driver for scheme 'nosuch'"),
    ],
)
def test_ping_with_a_bad_url_fails_at_once_naming_it(capsys, url: str, what: str) -> None:
    assert main(["ping", url, "--name", "pinger"]) == 2
    err = capsys.readouterr().err  # not retried for the 5 s --timeout as "cannot reach"
    assert what in err
    assert "cannot reach" not in err


@pytest.mark.parametrize(
    ("args", "what"),
    [
        (["tcp://localhost", "--connect"], "no port"),
        (["tcp://localhost"], "no port"),
        (["tcp://127.0.0.1:9?send_timeout=soon", "--connect"], "send_timeout='soon'"),
        (["nosuch://127.0.0.1:9"], "no driver for scheme 'nosuch'"),
    ],
)
def test_serve_with_a_bad_url_fails_at_once_naming_it(args: list, what: str) -> None:
    out = run("serve", *args, "--name", "srv", timeout=30)  # before the fix --connect ran on forever
    assert out.returncode == 2, out.stdout + out.stderr
    assert what in out.stderr


# -- 2. numeric options that must be positive ----------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--count", "0"),
        ("--count", "-1"),
        ("--size", "-1"),
        ("--timeout", "0"),
        ("--timeout", "-2"),
        ("--app-id", "-1"),
    ],
)
def test_ping_refuses_a_value_out_of_range(capsys, option: str, value: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["ping", "tcp://127.0.0.1:9", "--name", "pinger", option, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert option in err
    assert "must be" in err


@pytest.mark.parametrize("value", ["0", "-1"])
def test_serve_refuses_a_heartbeat_out_of_range(capsys, value: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "tcp://0:0", "--heartbeat", value])
    assert exc.value.code == 2
    assert "must be" in capsys.readouterr().err


# -- 3. demo with an unknown scheme ---------------------------------------------------------


def test_demo_with_an_unknown_scheme_names_it_and_the_installed_ones(capsys, monkeypatch) -> None:
    monkeypatch.setenv("SFM_DEMO_SCHEMES", "tcpx")
    assert main(["demo"]) == 2
    captured = capsys.readouterr()
    assert "no usable driver installed" not in captured.out + captured.err
    assert "unknown scheme in SFM_DEMO_SCHEMES: tcpx" in captured.err
    line = next(x for x in captured.err.splitlines() if x.startswith("installed:"))
    assert "tcp" in line.removeprefix("installed:").replace(",", " ").split()


# -- 4. serve on all interfaces says so ----------------------------------------------------


def test_serve_on_all_interfaces_says_what_is_bound_and_what_peers_use() -> None:
    proc = subprocess.Popen([*SFM, "serve", "tcp://0:0", "--name", "srv"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "all interfaces (0.0.0.0:" in line, line
        url = line.rsplit(" ", 1)[1].strip()  # the last word: a URL this machine can ping
        assert url.startswith("tcp://127.0.0.1:")
        assert url.rsplit(":", 1)[1] in line.split("0.0.0.0:", 1)[1]
        out = run("ping", url, "--name", "pinger", "--count", "1", "--timeout", str(scaled(5)))
        assert "connected to srv" in out.stdout, out.stderr
    finally:
        proc.terminate()
        proc.wait(scaled(10))
        proc.stdout.close()


# -- 5. a port in use, reported once -------------------------------------------------------


def test_a_port_in_use_is_reported_once_plainly() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        url = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        out = run("serve", url, "--name", "srv")
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip() == f"sfm serve: cannot listen on {url}: address already in use"
    assert out.stdout == ""


# -- 6. --version, python -m sfm_core, -v anywhere, help, --timeout as a whole -------------


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"sfm {__version__}"


def test_python_m_sfm_core_works_like_sfm() -> None:
    out = run("drivers", "--json", cmd=[sys.executable, "-m", "sfm_core"])
    assert out.returncode == 0, out.stderr
    assert "tcp" in {d["scheme"] for d in json.loads(out.stdout)["drivers"]}


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        (["-v", "ping", "tcp://h:1", "--name", "n"], 1),
        (["ping", "tcp://h:1", "--name", "n", "-v"], 1),
        (["serve", "-vv", "tcp://0:1"], 2),
        (["-v", "drivers", "-v"], 2),
    ],
)
def test_verbose_before_or_after_the_subcommand(argv: list, level: int) -> None:
    args = build_parser().parse_args(argv)
    assert args.verbose + args.sub_verbose == level


def test_ping_help_explains_every_option_with_its_default(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["ping", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "url " in out and "connect to" in out
    assert "round trips (default: 10)" in out
    assert "--app-id" in out and "(default: 1)" in out
    assert "(default: 100)" in out and "(default: 5.0)" in out


def test_timeout_bounds_the_wait_for_echoes_too() -> None:
    timeout = scaled(2)
    with serving([*SFM, "serve", "tcp://127.0.0.1:0", "--name", "quiet"]) as (proc, url):
        out = run("ping", url, "--name", "pinger", "--count", "3", "--timeout", str(timeout))
    assert out.returncode == 1
    # The echo wait used to be a fixed 10 s of its own ("no echo within 10 s").
    assert f"no echo from quiet within --timeout {float(timeout)} s" in out.stderr
    assert "10 s" not in out.stderr


# -- 7. progress on stderr, results on stdout; a table that fits; --json -------------------


@pytest.fixture
def echo_server():
    with serving([*SFM, "serve", "tcp://127.0.0.1:0", "--name", "echo-srv", "--echo", "1"]) as served:
        yield served


def test_ping_progress_on_stderr_results_on_stdout(echo_server) -> None:
    proc, url = echo_server
    out = run("ping", url, "--name", "pinger", "--count", "2", "--timeout", str(scaled(5)))
    assert out.returncode == 0, out.stderr
    assert f"connecting to {url} ..." in out.stderr
    assert "connecting" not in out.stdout
    assert "2 round trips" in out.stdout


def test_serve_connect_progress_on_stderr(echo_server) -> None:
    proc, url = echo_server
    client = subprocess.Popen(
        [*SFM, "serve", url, "--connect", "--name", "client"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert client.stderr.readline().startswith(f"client connecting to {url}")
        assert client.stdout.readline().startswith("endpoint echo-srv: READY")
    finally:
        client.terminate()
        client.wait(scaled(10))
        client.stdout.close()
        client.stderr.close()


def test_ping_json(echo_server) -> None:
    proc, url = echo_server
    out = run("ping", url, "--name", "pinger", "--count", "3", "--json", "--timeout", str(scaled(5)))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["peer"] == "echo-srv"
    assert result["url"] == url
    assert result["round_trips"]["count"] == 3
    assert result["round_trips"]["size"] == 100
    assert 0 < result["round_trips"]["min_us"] <= result["round_trips"]["max_us"]
    assert "peer_addr" in result["connection"]


def test_drivers_table_fits_the_terminal() -> None:
    for width in (80, 120):
        out = run("drivers", env=dict(os.environ, COLUMNS=str(width)))
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert max(len(line) for line in lines) <= width, "\n".join(lines)
        assert lines[0].split()[0] == "scheme"
        assert any(line.startswith("tcp ") for line in lines)


def test_demo_progress_on_stderr_legend_and_json() -> None:
    env = dict(os.environ, SFM_DEMO_SCHEMES="tcp")
    out = run("demo", env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[1/1] tcp:" in out.stderr and "[1/1] tcp: done" in out.stderr
    assert "[1/" not in out.stdout
    assert "up = client to server" in out.stdout and "messages = " in out.stdout

    out = run("demo", "--json", env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    (row,) = result["results"]
    assert row["scheme"] == "tcp" and row["ok"] is True and row["messages"] == 408
    assert "tcp" in {d["scheme"] for d in result["drivers"]}


# -- 8. bench without psutil ----------------------------------------------------------------


def test_bench_fan_in_listener_works_without_psutil(tmp_path, monkeypatch) -> None:
    from sfm_core.bench import fanin, runner

    (tmp_path / "psutil.py").write_text("raise ImportError('psutil hidden by the test')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    rows = {r.workload: r for r in runner._sfm_fanin("tcp", 5, fanin.tcp_fanin)}
    assert rows["fanin_ready"].value == 5
    assert rows["fanin_rss"].value > 0
    assert rows["fanin_threads"].value > 0


# -- sfm drivers: --why, denied, strict ------------------------------------------------------


def _sfm(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sfm_core", *args],
        capture_output=True,
        text=True,
        timeout=scaled(60),
        env={**os.environ, "COLUMNS": "1000", **env},  # wide: no wrapped cells
    )


def test_drivers_why_says_who_serves_a_scheme_and_by_which_rule(capsys) -> None:
    assert main(["drivers", "--why", "tcp"]) == 0
    out = capsys.readouterr().out
    assert "claimed by sfm-driver-tcp" in out and "chosen: sfm-driver-tcp" in out


def test_drivers_shows_a_denied_distribution_and_why() -> None:
    r = _sfm(["drivers", "--json"], {"SFM_DRIVERS_DENY": "sfm_driver_grpc"})  # normalized: sfm-driver-grpc
    assert r.returncode == 0, r.stderr
    grpc = [e for e in json.loads(r.stdout)["drivers"] if e["scheme"] == "grpc"]
    assert grpc and grpc[0]["status"] == "denied" and "SFM_DRIVERS_DENY" in grpc[0]["error"]


def test_drivers_in_strict_mode_exits_1_when_a_driver_fails_and_still_shows_the_table(tmp_path) -> None:
    info = tmp_path / "sfm_driver_broken-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sfm-driver-broken\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[sfm.drivers]\nbrokenx = sfm_driver_broken:Driver\n")
    (tmp_path / "sfm_driver_broken.py").write_text("raise ImportError('this driver is broken on purpose')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    lenient = _sfm(["drivers"], env)
    assert lenient.returncode == 0, lenient.stderr
    assert "broken on purpose" in lenient.stdout
    strict = _sfm(["drivers"], {**env, "SFM_DRIVERS_STRICT": "1"})
    assert strict.returncode == 1
    assert "broken on purpose" in strict.stdout  # the table
    assert "strict mode" in strict.stderr and "brokenx" in strict.stderr


# -- a refused handshake reaches sfm ping with its reason ------------------------------------


def test_ping_with_the_servers_own_name_prints_the_servers_reason() -> None:
    """Before: "cannot reach ... within 5.0 s" while the server logged the reason 14 times."""
    with serving([*SFM, "serve", "tcp://127.0.0.1:0", "--name", "server"]) as (proc, url):
        out = run("ping", url, "--name", "server", "--timeout", str(scaled(30)))
    assert out.returncode == 1
    assert "refused our handshake; its reason: peer claims our own endpoint name 'server'" in out.stderr
    assert "cannot reach" not in out.stderr


def test_sfm_conformance_is_a_command_of_sfm(capsys) -> None:
    """issue 9: `sfm conformance SCHEME` runs the driver conformance suite (docs/conformance.md)."""
    with pytest.raises(SystemExit) as exit_:
        main(["conformance", "--help"])
    assert exit_.value.code == 0
    assert "conformance suite" in capsys.readouterr().out


def test_demo_runs_a_path_based_driver(monkeypatch, capsys) -> None:
    """issue 9: the demo hard-coded SCHEME://127.0.0.1:0; a driver now says how it listens on
    a free address (capabilities()["listen_url"]), so the UDS example runs in the demo."""
    from pathlib import Path

    from sfm_core import get_plugin_manager, hookimpl

    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "docs" / "examples" / "sfm-driver-uds"))
    uds = pytest.importorskip("sfm_driver_uds")

    class Serves:
        @hookimpl
        def sfm_driver_classes(self):
            return {"udsdemo": uds.UdsDriver}

    plugin = Serves()
    get_plugin_manager().register(plugin, name="uds-for-the-demo")
    try:
        monkeypatch.setenv("SFM_DEMO_SCHEMES", "udsdemo")
        assert main(["demo", "--json"]) == 0
    finally:
        get_plugin_manager().unregister(plugin)
    [result] = json.loads(capsys.readouterr().out)["results"]
    assert result["scheme"] == "udsdemo" and result["ok"]


def test_serve_url_masks_its_password_in_the_log_too() -> None:
    """Only ``sfm serve --config`` masked passwords in log lines; ``sfm serve URL`` logged
    its connector (-vv) with the URL as given."""
    url = "tcp://user:secret@127.0.0.1:1"  # nothing listens on port 1
    proc = subprocess.Popen(
        [*SFM, "serve", url, "--connect", "--name", "client", "-vv"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    give_up = threading.Timer(scaled(30), proc.kill)  # the loop below then sees EOF
    give_up.start()
    try:
        for line in proc.stderr:  # until a log line (not the progress line) shows the URL
            lines.append(line)
            if " DEBUG " in line and ("secret" in line or "user:***@127.0.0.1:1" in line):
                break
    finally:
        give_up.cancel()
        give_up.join()
        proc.kill()
        out, err = proc.communicate(timeout=scaled(20))
    logged = [line for line in lines if " DEBUG " in line and "127.0.0.1:1" in line]
    assert logged, "no log line with the URL: " + "".join(lines)
    assert "user:***@127.0.0.1:1" in logged[-1]
    assert "secret" not in "".join(lines) + err + out


def test_ping_masks_the_password_of_its_url() -> None:
    """``sfm ping`` printed its URL as given in its progress and its errors."""
    out = run("ping", "tcp://user:secret@127.0.0.1:1", "--name", "p", "--timeout", "1")
    assert out.returncode == 1
    assert "cannot reach tcp://user:***@127.0.0.1:1" in out.stderr
    assert "secret" not in out.stdout + out.stderr


def test_the_log_masking_of_a_command_ends_with_it(capsys) -> None:
    """main() masks log records only while it runs: a program (or a test) that calls it keeps
    its own logging as it was."""
    import logging

    from sfm_core.masking import MaskingFilter

    assert main(["drivers"]) == 0
    capsys.readouterr()
    for handler in logging.getLogger().handlers:
        assert not any(isinstance(f, MaskingFilter) for f in handler.filters)
