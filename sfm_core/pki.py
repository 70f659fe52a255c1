"""A throwaway PKI for loopback runs (``sfm demo``, ``sfm bench``): one CA, a server and a client
certificate, written with fixed file names into a directory the caller owns and removes.

The certificates are made with ``trustme`` (a test dependency, imported only here): without it
:func:`make_pki` raises ImportError and the callers skip their secure schemes. Never use these
files for anything but loopback: the CA key exists only in memory, for a moment.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

#: The file of each TLS connector param inside a PKI directory.
FILES = {
    "ca_cert": "ca.pem",
    "server_cert": "server.crt",
    "server_key": "server.key",
    "client_cert": "client.crt",
    "client_key": "client.key",
}
#: The hosts the server certificate names (its SANs): what a loopback client dials.
HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Pki:
    """The directory and the TLS connector params of each side."""

    directory: str
    server: dict[str, str]
    client: dict[str, str]


def available() -> bool:
    """Whether :func:`make_pki` can make certificates (``trustme`` is installed)."""
    return importlib.util.find_spec("trustme") is not None


def params_in(directory: str, *, server: bool) -> dict[str, str]:
    """The TLS params of one side for the fixed file names in ``directory``."""
    side = "client" if server else "server"
    return {k: os.path.join(directory, f) for k, f in FILES.items() if not k.startswith(side)}


def make_pki(directory: str, server_cn: str, client_cn: str) -> Pki:
    """A new CA and a server (CN ``server_cn``, SANs 127.0.0.1 and localhost) and a client
    (CN ``client_cn``) certificate signed by it, written into ``directory``.

    Raises ImportError when ``trustme`` is not installed."""
    import trustme

    ca = trustme.CA()
    ca.cert_pem.write_to_path(os.path.join(directory, FILES["ca_cert"]))
    for side, cn in (("server", server_cn), ("client", client_cn)):
        cert = ca.issue_cert(*HOSTS, common_name=cn)
        # The leaf alone: the peer's ca_cert is the CA that signed it.
        cert.cert_chain_pems[0].write_to_path(os.path.join(directory, FILES[f"{side}_cert"]))
        cert.private_key_pem.write_to_path(os.path.join(directory, FILES[f"{side}_key"]))
    return Pki(directory, params_in(directory, server=True), params_in(directory, server=False))
