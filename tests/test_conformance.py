"""The driver conformance suite (``sfm_core.testing``, docs/conformance.md) on our own drivers,
and its pytest plugin's on/off behaviour.

Each scheme runs in a process of its own (``python -m sfm_core.testing SCHEME``, what
``sfm conformance SCHEME`` runs): the suite starts and stops drivers, child listeners and
grpc's process-global state, none of which should touch this test process (its leak check).

Cost, measured on the 2-core CI machine: the whole suite takes 7-8 s per scheme (tcp, ws,
grpc, and their TLS schemes stcp, wss, grpcs alike), so the six distinct transports run it
whole (~45 s). ``http`` and ``https`` are the WebSocket driver again under another name: they
run the checks where the scheme name matters (the driver resolves, the listener reports a URL
of that scheme that works from another process, the handshake, DATA) in ~3 s each. With the
plugin checks below, about a minute in all.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from helpers import scaled

FULL = ["tcp", "ws", "grpc", "stcp", "wss", "grpcs"]
#: The same driver as ws/wss under another scheme name: the checks the name can change.
ALIASES = {"http": "ws", "https": "wss"}
ALIAS_CHECKS = "declares or handshake_both_ways or reports_a_url or data_of_every"

DRIVER_MODULE = {
    "tcp": "sfm_driver_tcp",
    "stcp": "sfm_driver_tcp",
    "grpc": "sfm_driver_grpc",
    "grpcs": "sfm_driver_grpc",
}


def _needs(scheme: str) -> None:
    pytest.importorskip(DRIVER_MODULE.get(scheme, "sfm_driver_websocket"))


def _run(argv: list[str], cwd: str | None = None, timeout: float = 100.0, env: dict | None = None):
    full_env = {**os.environ, **(env or {})}
    full_env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=scaled(timeout), env=full_env, check=False
    )


def _explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-8000:]}\n--- stderr ---\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("scheme", FULL + list(ALIASES))
def test_our_driver_passes_the_conformance_suite(scheme: str) -> None:
    _needs(scheme)
    argv = [sys.executable, "-m", "sfm_core.testing", scheme]
    if scheme in ALIASES:
        argv += ["-k", ALIAS_CHECKS]
    result = _run(argv)
    assert result.returncode == 0, _explain(result)
    assert " passed" in result.stdout and "failed" not in result.stdout, _explain(result)


def test_the_plugin_collects_nothing_unless_asked(tmp_path) -> None:
    (tmp_path / "test_own.py").write_text("def test_own():\n    pass\n")
    pytest_cmd = [sys.executable, "-m", "pytest", "-p", "sfm_core.testing.plugin", "--collect-only", "-q"]
    result = _run([*pytest_cmd, "-p", "no:cacheprovider"], cwd=str(tmp_path))
    assert result.returncode == 0, _explain(result)
    assert "test_own.py::test_own" in result.stdout and "suite.py" not in result.stdout, _explain(result)
    assert "1 test collected" in result.stdout, _explain(result)
    # Installed, it is loaded by its entry point (no -p) and still inactive.
    result = _run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=str(tmp_path))
    assert "1 test collected" in result.stdout and "suite.py" not in result.stdout, _explain(result)
    result = _run([sys.executable, "-m", "pytest", "--help"], cwd=str(tmp_path))
    assert "--sfm-conformance=SCHEME" in result.stdout, "the pytest11 entry point did not load the plugin"


def test_one_conftest_line_turns_the_suite_on(tmp_path) -> None:
    _needs("tcp")
    (tmp_path / "conftest.py").write_text('sfm_conformance_scheme = "tcp"\n')
    (tmp_path / "test_own.py").write_text("def test_own():\n    pass\n")
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
    result = _run([*base, "--collect-only", "-q"], cwd=str(tmp_path))
    assert result.returncode == 0, _explain(result)
    assert "test_own.py::test_own" in result.stdout, _explain(result)
    assert "suite.py::test_handshake_both_ways_exchanges_names_properties_and_addresses" in result.stdout, _explain(
        result
    )
    result = _run([*base, "-q", "-k", "handshake_both_ways or own"], cwd=str(tmp_path))
    assert result.returncode == 0 and "2 passed" in result.stdout, _explain(result)


def test_a_listener_reporting_a_url_that_does_not_work_fails_naming_the_rule(tmp_path) -> None:
    """What the suite was written for: a listener that reports a port it does not listen on."""
    _needs("tcp")
    (tmp_path / "conftest.py").write_text(
        textwrap.dedent(
            """
            from sfm_core import get_registry
            from sfm_driver_tcp import TcpDriver

            class WrongPortDriver(TcpDriver):
                def listen(self, connector):
                    report = connector.listening

                    def wrong(url):
                        head, port = url.rsplit(":", 1)
                        report(f"{head}:{int(port) + 1}")

                    connector.listening = wrong
                    super().listen(connector)

            get_registry().register("tcp", WrongPortDriver)
            sfm_conformance_scheme = "tcp"
            """
        )
    )
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-k", "handshake_both_ways"]
    # The check waits 10 s for a READY that cannot come; a third of that shows it as well.
    result = _run(argv, cwd=str(tmp_path), env={"SFM_TESTS_TIMEOUT_FACTOR": "0.3"})
    assert result.returncode == 1, _explain(result)
    assert "never saw 'server' READY" in result.stdout, _explain(result)
    assert "listen() binds, then calls connector.listening(url) with the real URL" in result.stdout, _explain(result)
    assert "docs/plugins.md, 'The contract': listen" in result.stdout, _explain(result)


def test_the_command_fails_when_no_check_passed(tmp_path) -> None:
    result = _run([sys.executable, "-m", "sfm_core.testing", "nosuchscheme", "-k", "declares"])
    assert result.returncode != 0, _explain(result)
    assert "no usable driver for scheme 'nosuchscheme'" in result.stdout, _explain(result)
    assert "entry-point group 'sfm.drivers'" in result.stdout, _explain(result)
