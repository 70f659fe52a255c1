"""The ``sfm`` command line: serve, ping, demo, drivers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import scaled, serving, wait_until

SFM = [sys.executable, "-m", "sfm_core.cli"]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*SFM, *args], capture_output=True, text=True, timeout=scaled(timeout))


#: ``sfm ping --timeout``: how long it waits for the handshake (its own default is 5 s).
HANDSHAKE_WAIT = str(scaled(5))


@pytest.fixture
def echo_server():
    """``sfm serve tcp://127.0.0.1:0 --echo 1`` in a subprocess; yields (proc, url)."""
    with serving([*SFM, "serve", "tcp://127.0.0.1:0", "--name", "echo-srv", "--echo", "1"]) as served:
        yield served


def test_ping_against_serve_echo(echo_server) -> None:
    proc, url = echo_server
    out = run("ping", url, "--name", "pinger", "--count", "20", "--size", "1000", "--timeout", HANDSHAKE_WAIT)
    assert out.returncode == 0, out.stderr
    assert "connected to echo-srv" in out.stdout
    assert "peer_addr" in out.stdout
    assert "20 round trips of 1000 B" in out.stdout
    # serve printed the endpoint state changes of its peer.
    line = wait_until(proc.stdout.readline, what="serve output")
    assert line.startswith("endpoint pinger: READY")


def test_ping_an_unreachable_peer_fails_clearly() -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    out = run("ping", f"tcp://127.0.0.1:{port}", "--name", "pinger", "--timeout", "1")
    assert out.returncode == 1
    assert f"cannot reach tcp://127.0.0.1:{port} within 1.0 s" in out.stderr
    assert "Connection refused" in out.stderr


def test_ping_with_an_unknown_scheme_names_it() -> None:
    out = run("ping", "nosuch://127.0.0.1:1", "--name", "pinger")
    assert out.returncode == 2
    assert "no driver for scheme 'nosuch'" in out.stderr


def test_ping_a_peer_that_does_not_echo_times_out_clearly() -> None:
    proc = subprocess.Popen([*SFM, "serve", "tcp://127.0.0.1:0", "--name", "quiet"], stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().rsplit(" ", 1)[1].strip()
        out = run("ping", url, "--name", "pinger", "--count", "1", "--timeout", HANDSHAKE_WAIT, timeout=60)
        assert out.returncode == 1
        assert "no echo from quiet" in out.stderr
    finally:
        proc.terminate()
        proc.wait(scaled(10))
        proc.stdout.close()


def test_demo_shows_drivers_and_messages_flowing() -> None:
    env = dict(os.environ, SFM_DEMO_SCHEMES="tcp")
    out = subprocess.run([*SFM, "demo"], capture_output=True, text=True, timeout=scaled(120), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Drivers discovered through entry points:" in out.stdout
    assert "tcp    sfm-driver-tcp" in out.stdout
    row = next(line for line in out.stdout.splitlines() if line.startswith("tcp "))
    assert row.split()[-1] == "ok"
    assert row.split()[-2] == "408"  # 200 pings + 200 echoes + 4 x 8 MiB each way


def test_drivers_json_is_machine_readable() -> None:
    out = run("drivers", "--json")
    assert out.returncode == 0
    schemes = {d["scheme"] for d in json.loads(out.stdout)["drivers"]}
    assert "tcp" in schemes
