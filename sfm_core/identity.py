"""Identity binding on mutual TLS, as NVFlare 2.9 does it: the endpoint name a peer claims in
its handshake must resolve to the common name of its certificate (``docs/security.md``)."""

from __future__ import annotations

from collections.abc import Mapping

#: Names of this form are exempt (NVFlare's admin clients).
ADMIN_PREFIX = "_admin_"
#: A leaf of this form belongs to its parent (NVFlare's client API processes).
CLIENT_API_PREFIX = "-client_api_"


def resolve_identity(claimed: str, local_name: str, explicit: Mapping[str, str] | None = None) -> str | None:
    """The certificate identity the endpoint name ``claimed`` must carry, or None if exempt.

    In order: ``_admin_<uuid>`` is exempt; an explicit map entry (the name itself, else the
    longest prefix of it that is mapped); a ``-client_api_...`` leaf stands for its parent;
    a child of the local endpoint (``srv.drv`` seen by ``srv``) resolves to its leaf; any
    other name to its first dot-separated part (``site-1.job_7`` -> ``site-1``).
    """
    if claimed.startswith(ADMIN_PREFIX):
        return None
    if explicit:
        if claimed in explicit:
            return explicit[claimed]
        prefixes = [p for p in explicit if claimed.startswith(p)]
        if prefixes:
            return explicit[max(prefixes, key=len)]
    parts = claimed.split(".")
    if len(parts) > 1 and parts[-1].startswith(CLIENT_API_PREFIX):
        parts = parts[:-1]
    if len(parts) > 1 and ".".join(parts[:-1]) == local_name:
        return parts[-1]
    return parts[0]


def check_identity(
    claimed: str, cert_cn: str | None, local_name: str, explicit: Mapping[str, str] | None = None
) -> str | None:
    """Why a peer claiming ``claimed`` with a certificate for ``cert_cn`` is refused, or None."""
    identity = resolve_identity(claimed, local_name, explicit)
    if identity is None:
        return None
    if not cert_cn:
        return f"peer claims endpoint {claimed!r} but its certificate has no common name"
    if cert_cn != identity:
        return f"peer claims endpoint {claimed!r} (identity {identity!r}) but its certificate is for {cert_cn!r}"
    return None
