"""The example driver (docs/examples/sfm-driver-uds) and its tutorial (docs/driver-authors.md):
the conformance suite on it, in a process of its own, when it is installed (CI installs it:
``.ci/run``); the tutorial's excerpts are its code word for word; and
``sfm_core.listen_url.free_listen_url``, the listen-URL rule ``sfm demo`` shares with the suite.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import scaled

from sfm_core import CommError
from sfm_core.listen_url import LISTEN_URL_CAPABILITY, free_listen_url, listen_url_from_capabilities

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "sfm-driver-uds"
TUTORIAL = ROOT / "docs" / "driver-authors.md"
INSTALL = "pip install -e docs/examples/sfm-driver-uds --config-settings editable_mode=compat"


def _installed() -> None:
    try:
        importlib.metadata.distribution("sfm-driver-uds")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"the example driver is not installed ({INSTALL}; .ci/run does)")


def _run(argv: list, cwd: Path | None = None, timeout: float = 180):
    env = dict(os.environ)
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=scaled(timeout), env=env)


def _explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-8000:]}\n--- stderr ---\n{result.stderr[-4000:]}"


def test_the_example_passes_sfm_conformance_uds():
    _installed()
    result = _run([sys.executable, "-m", "sfm_core.testing", "uds"])
    assert result.returncode == 0, _explain(result)
    summary = result.stdout.strip().splitlines()[-1]
    assert re.search(r"\b(19|[2-9]\d) passed", summary) and "failed" not in summary, _explain(result)


def test_the_examples_own_tests_turn_the_suite_on_and_pass():
    _installed()
    result = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=EXAMPLE)
    assert result.returncode == 0, _explain(result)
    summary = result.stdout.strip().splitlines()[-1]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= 25, f"{summary}: the conformance suite did not run with the package's own tests"


def _excerpts() -> list[tuple[str, str]]:
    text = TUTORIAL.read_text(encoding="utf-8")
    found = re.findall(r"<!-- excerpt: (\S+) -->\n[^\n]*\n\n```\w*\n(.*?)\n```", text, flags=re.S)
    assert len(found) == text.count("<!-- excerpt:"), "an excerpt marker without its code block after it"
    return found


def test_the_tutorials_excerpts_are_the_examples_code_word_for_word():
    excerpts = _excerpts()
    assert len(excerpts) >= 8
    for path, body in excerpts:
        source = (EXAMPLE / path).read_text(encoding="utf-8")
        assert body in source, f"docs/driver-authors.md quotes {path} as it no longer is:\n{body[:400]}"


def test_the_tutorial_covers_the_whole_driver():
    """Every class and function of the driver module is quoted or named in the tutorial."""
    source = (EXAMPLE / "sfm_driver_uds" / "driver.py").read_text(encoding="utf-8")
    text = TUTORIAL.read_text(encoding="utf-8")
    names = re.findall(r"^\s*(?:def|class) (\w+)", source, flags=re.M)
    missing = [n for n in names if n not in text]
    assert not missing, f"docs/driver-authors.md says nothing of {missing}"


class _Ports:
    @staticmethod
    def capabilities() -> dict:
        return {"max_frame_size": 1 << 20}


class _Path:
    @staticmethod
    def capabilities() -> dict:
        return {"max_frame_size": 1 << 20, LISTEN_URL_CAPABILITY: "{scheme}://{tmpdir}/sfm.sock"}


class _Bad:
    @staticmethod
    def capabilities() -> dict:
        return {LISTEN_URL_CAPABILITY: "{scheme}://{tmpdir}/{port}"}


def test_free_listen_url_is_the_suites_rule():
    pytest.importorskip("pytest")
    from sfm_core.testing import LISTEN_URL_CAPABILITY as SUITE_KEY
    from sfm_core.testing.suite import make_listen_url

    assert SUITE_KEY == LISTEN_URL_CAPABILITY
    for cls in (_Ports, _Path):
        for scheme in ("foo", "uds"):
            assert free_listen_url(cls, scheme, "/tmp/d") == make_listen_url(scheme, cls.capabilities(), "/tmp/d")
    assert free_listen_url(_Ports, "foo", "/tmp/d") == "foo://127.0.0.1:0"
    assert free_listen_url(_Path(), "uds", "/tmp/d") == "uds:///tmp/d/sfm.sock"  # an instance will do
    assert listen_url_from_capabilities("x", {LISTEN_URL_CAPABILITY: ""}, "/t") == "x://127.0.0.1:0"


def test_free_listen_url_names_a_bad_template():
    with pytest.raises(CommError) as e:
        free_listen_url(_Bad, "foo", "/tmp/d")
    assert e.value.code == CommError.BAD_CONFIG
    assert "{scheme} and {tmpdir}" in str(e.value) and "foo://" in str(e.value)


def test_free_listen_url_of_the_installed_example():
    _installed()
    from sfm_core import get_registry

    driver_class = get_registry().get_driver_class("uds")
    assert free_listen_url(driver_class, "uds", "/tmp/d") == "uds:///tmp/d/sfm.sock"
