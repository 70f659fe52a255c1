"""Operator configuration: an endpoint, its connectors and driver choices in one TOML file.

Example (``sfm serve --config site.toml``)::

    [endpoint]
    name = "site-1"
    properties = { org = "hospital-a" }

    [manager]                 # ConnManager options
    heartbeat_interval = 30

    [drivers]                 # which distribution serves a scheme, when several claim it
    tcp = "sfm-driver-tcp"

    [[connector]]
    url = "tcp://0:8002"
    mode = "passive"

    [[connector]]
    url = "grpc://server.example:8003"
    mode = "active"
    params = { connect_timeout = 5 }

Every mistake is a ``CommError(BAD_CONFIG)`` naming the file and the offending entry.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .conn_manager import ConnManager
from .driver import Mode
from .endpoint import Endpoint
from .errors import CommError
from .registry import DriverRegistry, get_registry

_SECTIONS = {"endpoint", "manager", "drivers", "connector"}
_CONNECTOR_KEYS = {"url", "mode", "params"}
_MANAGER_OPTIONS = {
    name
    for name, p in inspect.signature(ConnManager.__init__).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "registry"
}


@dataclass
class ConnectorConfig:
    url: str
    mode: Mode
    params: dict = field(default_factory=dict)


@dataclass
class Config:
    """A parsed configuration; :meth:`build` makes the ConnManager it describes."""

    name: str
    properties: dict = field(default_factory=dict)
    manager: dict = field(default_factory=dict)
    drivers: dict = field(default_factory=dict)
    connectors: list[ConnectorConfig] = field(default_factory=list)

    def build(self, registry: DriverRegistry | None = None) -> tuple[ConnManager, list[str]]:
        """A ConnManager with every connector added (not started), and the connector handles."""
        registry = registry or get_registry()
        for scheme, dist in self.drivers.items():
            registry.prefer(scheme, dist)
        manager = ConnManager(Endpoint(self.name, self.properties), registry=registry, **self.manager)
        handles = [manager.add_connector(c.url, dict(c.params), c.mode) for c in self.connectors]
        return manager, handles


def load_config(path: str | Path) -> Config:
    """Read and check a TOML configuration file."""
    import tomllib

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise CommError(CommError.BAD_CONFIG, f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise CommError(CommError.BAD_CONFIG, f"{path}: not valid TOML: {e}") from None
    return parse_config(data, str(path))


def parse_config(data: dict, source: str = "config") -> Config:
    """Check a configuration already loaded as a dict (see the module docstring)."""

    def bad(what: str) -> CommError:
        return CommError(CommError.BAD_CONFIG, f"{source}: {what}")

    unknown = set(data) - _SECTIONS
    if unknown:
        raise bad(f"unknown section(s) {sorted(unknown)}; expected {sorted(_SECTIONS)}")
    endpoint = _table(data, "endpoint", bad)
    extra = set(endpoint) - {"name", "properties"}
    if extra:
        raise bad(f"[endpoint]: unknown key(s) {sorted(extra)}")
    name = endpoint.get("name")
    if not isinstance(name, str) or not name:
        raise bad("[endpoint] needs a name")
    properties = endpoint.get("properties", {})
    if not isinstance(properties, dict):
        raise bad("[endpoint] properties must be a table")
    manager = _table(data, "manager", bad)
    extra = set(manager) - _MANAGER_OPTIONS
    if extra:
        raise bad(f"[manager]: unknown option(s) {sorted(extra)}; known: {sorted(_MANAGER_OPTIONS)}")
    drivers = _table(data, "drivers", bad)
    for scheme, dist in drivers.items():
        if not isinstance(dist, str):
            raise bad(f"[drivers] {scheme} must name a distribution (a string)")
    connectors = []
    items = data.get("connector", [])
    if not isinstance(items, list):
        raise bad("connectors are written [[connector]]")
    for i, item in enumerate(items, 1):
        where = f"connector {i}"
        if not isinstance(item, dict):
            raise bad(f"{where}: must be a table")
        extra = set(item) - _CONNECTOR_KEYS
        if extra:
            raise bad(f"{where}: unknown key(s) {sorted(extra)}; expected {sorted(_CONNECTOR_KEYS)}")
        url = item.get("url")
        if not isinstance(url, str) or "://" not in url:
            raise bad(f"{where}: url must be like 'tcp://host:port', got {url!r}")
        try:
            mode = Mode(str(item.get("mode", "")).lower())
        except ValueError:
            raise bad(f"{where}: mode must be 'active' or 'passive', got {item.get('mode')!r}") from None
        params = item.get("params", {})
        if not isinstance(params, dict):
            raise bad(f"{where}: params must be a table")
        connectors.append(ConnectorConfig(url, mode, params))
    if not connectors:
        raise bad("no [[connector]]: nothing to listen on or connect to")
    return Config(name, properties, manager, drivers, connectors)


def _table(data: dict, key: str, bad: Any) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise bad(f"[{key}] must be a table")
    return value
