"""Connector URLs: ``scheme://host:port/path?param=value`` to driver parameters, and back."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

from .errors import CommError

ALL_INTERFACES = "0"


def parse_url(url: str) -> dict:
    """Parse a connector URL into driver params.

    Keys: ``scheme``, ``host``, ``port`` (int, when given), ``path`` (when given), ``url``, and
    every query parameter. Host ``0`` means all interfaces for a listener (see
    :func:`bind_host`). Raises ``CommError(BAD_CONFIG)`` naming what is wrong.
    """
    if not isinstance(url, str) or "://" not in url:
        raise CommError(CommError.BAD_CONFIG, f"not a connector URL (expected scheme://host:port): {url!r}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if not scheme:
        raise CommError(CommError.BAD_CONFIG, f"connector URL has no scheme: {url!r}")
    params: dict = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        params[key] = value
    params["scheme"] = scheme
    params["url"] = url
    try:
        port = parts.port
    except ValueError:
        raise CommError(CommError.BAD_CONFIG, f"invalid port in connector URL {url!r}") from None
    host = parts.hostname
    if host:
        params["host"] = host
    if port is not None:
        params["port"] = port
    if parts.path and parts.path != "/":
        params["path"] = parts.path
    return params


def bind_host(host: str | None) -> str:
    """The address a listener binds for a URL host: ``0`` (or none) is every interface."""
    if not host or host in (ALL_INTERFACES, "0.0.0.0"):
        return ""
    return host


def connect_host(host: str | None) -> str:
    """The address to connect to for a URL host: ``0`` (or none) is this machine."""
    if not host or host in (ALL_INTERFACES, "0.0.0.0"):
        return "127.0.0.1"
    return host


def listening_url(scheme: str, host: str | None, port: int) -> str:
    """The URL a listener reports once bound: for all interfaces (host ``0``), loopback."""
    return format_url(scheme, connect_host(host), port)


def connect_address(params: dict, driver: str) -> tuple[str, int]:
    """``(host, port)`` an active connector connects to; ``CommError(BAD_CONFIG)`` without a port."""
    from .params import get_param

    if "port" not in params:
        raise CommError(CommError.BAD_CONFIG, f"{driver}: no port to connect to in {params.get('url') or params}")
    return connect_host(params.get("host")), get_param(params, "port", int, 0, driver=driver, minimum=1)


def format_url(scheme: str, host: str, port: int, path: str = "") -> str:
    """Build ``scheme://host:port[path]``, bracketing IPv6 hosts."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}{path}"
