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
    return f"{scheme}://{host_port(host, port)}{path}"


def host_port(host: object, port: object = None) -> str:
    """``host:port``, with an IPv6 host in brackets (``[::1]:8002``); the host alone
    (bracketed the same way) when ``port`` is None.

    Also takes a socket address: ``host_port(sock.getpeername())`` formats an AF_INET or
    AF_INET6 tuple (extra fields are ignored); anything else (an AF_UNIX path, None) comes
    back as ``str()``. A host already in brackets is left as it is. This is the one place
    drivers bracket hosts: for URLs, gRPC targets, log lines and ``peer_addr``.
    """
    if port is None and isinstance(host, tuple):
        if len(host) < 2:
            return str(host)
        host, port = host[0], host[1]
    elif port is None and not isinstance(host, str):
        return str(host)
    host = str(host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return host if port is None else f"{host}:{port}"
