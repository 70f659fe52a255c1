"""Where a driver listens on a free address: the rule ``sfm demo`` and the conformance suite share.

A driver whose transport has ports listens on ``SCHEME://127.0.0.1:0`` and reports the port it
got. A transport without ports (a Unix socket file, a named pipe) says how it listens with a
template in ``capabilities()["listen_url"]``: ``{scheme}`` is the scheme, ``{tmpdir}`` a fresh,
short, empty directory of the caller's (a Unix socket path is limited to about 107 bytes), e.g.
``"{scheme}://{tmpdir}/sfm.sock"`` (docs/conformance.md, "How your driver listens on a free
address"). :func:`sfm_core.testing.suite.make_listen_url` applies the same rule; this module
needs no pytest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import CommError

#: The ``capabilities()`` key (the same as :data:`sfm_core.testing.LISTEN_URL_CAPABILITY`).
LISTEN_URL_CAPABILITY = "listen_url"


def listen_url_from_capabilities(scheme: str, capabilities: Mapping[str, Any], tmpdir: str) -> str:
    """The URL to listen on a free address for ``scheme`` given a driver's ``capabilities``:
    its ``listen_url`` template filled in, else ``SCHEME://127.0.0.1:0``. ``CommError(BAD_CONFIG)``
    if the template names a placeholder other than ``{scheme}`` and ``{tmpdir}``."""
    template = capabilities.get(LISTEN_URL_CAPABILITY)
    if not template:
        return f"{scheme}://127.0.0.1:0"
    try:
        return str(template).format(scheme=scheme, tmpdir=tmpdir)
    except (KeyError, IndexError, ValueError) as e:
        raise CommError(
            CommError.BAD_CONFIG,
            f"capabilities()[{LISTEN_URL_CAPABILITY!r}] of the {scheme}:// driver is {template!r}: "
            f"only {{scheme}} and {{tmpdir}} may be filled in ({type(e).__name__}: {e})",
        ) from None


def free_listen_url(driver_class: Any, scheme: str, tmpdir: str) -> str:
    """The URL on which ``driver_class`` (a :class:`sfm_core.Driver` subclass or instance)
    listens on a free address for ``scheme``; ``tmpdir`` is a fresh, short directory the caller
    made and removes after the listener stopped (unused by drivers with ports)."""
    capabilities = driver_class.capabilities()
    if not isinstance(capabilities, Mapping):
        capabilities = {}
    return listen_url_from_capabilities(scheme, capabilities, tmpdir)
