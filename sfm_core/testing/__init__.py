"""The driver conformance suite: checks that a transport driver keeps the contract of
``docs/plugins.md`` over real connections (``docs/conformance.md``).

Two ways to run it, both for an installed driver:

* ``sfm conformance SCHEME`` (or ``python -m sfm_core.testing SCHEME``): exits 0 when it passes;
* the pytest plugin :mod:`sfm_core.testing.plugin` (entry point ``pytest11``), inactive until
  asked: ``pytest --sfm-conformance=SCHEME``, or ``sfm_conformance_scheme = "SCHEME"`` in a
  driver package's ``conftest.py``.

Importing this package imports nothing of pytest; only :mod:`~sfm_core.testing.suite` and
:mod:`~sfm_core.testing.plugin` need it.
"""

from __future__ import annotations

#: The conftest attribute (and ini key) that turns the suite on for a scheme.
CONFTEST_ATTRIBUTE = "sfm_conformance_scheme"
#: The conftest attribute (and ini key) naming a TLS params file (JSON or TOML).
CONFTEST_TLS_ATTRIBUTE = "sfm_conformance_tls_params"
#: The ``capabilities()`` key a driver uses to say how it listens on a free address.
LISTEN_URL_CAPABILITY = "listen_url"

__all__ = ["CONFTEST_ATTRIBUTE", "CONFTEST_TLS_ATTRIBUTE", "LISTEN_URL_CAPABILITY"]
