"""The pytest plugin of the conformance suite, registered through the ``pytest11`` entry point.

Inactive unless asked for: with it installed, a test run collects nothing more and needs no
option. It is turned on by

* ``--sfm-conformance=SCHEME`` on the command line (and ``--sfm-tls-params=FILE``), or
* ``sfm_conformance_scheme = "SCHEME"`` in a ``conftest.py`` (and ``sfm_conformance_tls_params``), or
* ``sfm_conformance_scheme = SCHEME`` in the ini file (``[tool.pytest.ini_options]``).

Then the tests of :mod:`sfm_core.testing.suite` are added to the session, for that scheme
(see ``docs/conformance.md``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from . import CONFTEST_ATTRIBUTE, CONFTEST_TLS_ATTRIBUTE

SUITE_PATH = Path(__file__).with_name("suite.py")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sfm-conformance", "sfm driver conformance suite (docs/conformance.md)")
    group.addoption(
        "--sfm-conformance",
        metavar="SCHEME",
        default=None,
        help="run the sfm driver conformance suite on the installed driver for SCHEME",
    )
    group.addoption(
        "--sfm-tls-params",
        metavar="FILE",
        default=None,
        help="JSON or TOML file with the server and client TLS params for a secure SCHEME",
    )
    parser.addini(CONFTEST_ATTRIBUTE, "run the sfm driver conformance suite for this scheme", default="")
    parser.addini(CONFTEST_TLS_ATTRIBUTE, "TLS params file (JSON or TOML) for the conformance suite", default="")


def _from_conftests(config: pytest.Config, name: str) -> str | None:
    for plugin in config.pluginmanager.get_plugins():
        if str(getattr(plugin, "__file__", "") or "").endswith("conftest.py"):
            value = getattr(plugin, name, None)
            if value:
                return str(value)
    return None


def conformance_scheme(config: pytest.Config) -> str | None:
    """The scheme the suite runs for in this session, or None: the suite is off."""
    return (
        config.getoption("sfm_conformance", None)
        or _from_conftests(config, CONFTEST_ATTRIBUTE)
        or (config.getini(CONFTEST_ATTRIBUTE) or None)
    )


def conformance_tls_params(config: pytest.Config) -> str | None:
    """The TLS params file given for this session, or None."""
    return (
        config.getoption("sfm_tls_params", None)
        or _from_conftests(config, CONFTEST_TLS_ATTRIBUTE)
        or (config.getini(CONFTEST_TLS_ATTRIBUTE) or None)
    )


@pytest.hookimpl(tryfirst=True)  # before -k and -m deselect: they apply to the suite's tests too
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    if not conformance_scheme(config):
        return
    if any(Path(str(item.path)) == SUITE_PATH for item in items):
        return  # the suite's file was named on the command line: collected already
    module = pytest.Module.from_parent(session, path=SUITE_PATH)
    items.extend(session.genitems(module))


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Never collect the suite's file by accident (a test run over site-packages, or this
    source tree): only when the suite is on."""
    if collection_path == SUITE_PATH and not conformance_scheme(config):
        return True
    return None


def pytest_report_header(config: pytest.Config) -> str | None:
    scheme = conformance_scheme(config)
    if not scheme:
        return None
    tls = conformance_tls_params(config)
    return f"sfm conformance: scheme {scheme}" + (f", TLS params {tls}" if tls else "")
