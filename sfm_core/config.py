"""Operator configuration: an endpoint, its connectors and driver choices in one TOML file.

The reference is ``docs/configuration.md``. In short (``sfm serve --config site.toml``,
``ConnManager.from_config("site.toml")``, ``sfm config check site.toml``)::

    [endpoint]
    name = "site-1"
    properties = { org = "hospital-a" }

    [manager]                 # ConnManager options: heartbeats, dead peers, handshake, linger, ...
    heartbeat_interval = 30

    [drivers]                 # driver selection
    prefer = { tcp = "sfm-driver-tcp" }
    deny = ["sfm-driver-experimental"]
    required_drivers = ["tcp"]

    [[connector]]
    url = "tcp://0:8002"
    mode = "passive"
    params = { max_connections = 1000 }

    [[connector]]
    url = "grpcs://server.example:8003"
    mode = "active"
    params = { connect_timeout = 5 }
    tls = { ca_cert = "certs/ca.pem", client_cert = "certs/site-1.crt", client_key = "certs/site-1.key" }

Layers, later wins: the file, then environment variables (``SFM_MANAGER__LINGER=2``,
``SFM_CONNECTOR__0__URL=...``; :func:`env_overrides`), then what the caller gives
(``sfm serve --name``). Every mistake in every layer is collected: :class:`ConfigError`
(``CommError(BAD_CONFIG)``) lists them all, each a :class:`Problem` naming the key, the
line where it can be found, what was expected and what was found. Passwords in URLs are
masked (:func:`mask`) in every message.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import frames as fr
from .conn_manager import ConnManager
from .connectors import connector_errors
from .driver import Mode
from .driver_params import CORE_PARAMS
from .endpoint import Endpoint
from .errors import CommError
from .handshake import validate_endpoint_name
from .masking import MaskingFilter, mask
from .registry import OFFICIAL_PACKAGES, DriverRegistry, get_registry, normalize_name
from .url import parse_url

__all__ = [
    "Config",
    "ConfigError",
    "ConnectorConfig",
    "Key",
    "MaskingFilter",
    "Problem",
    "check_config",
    "env_overrides",
    "load_config",
    "mask",
    "parse_config",
]

ENV_PREFIX = "SFM_"
ENV_SEPARATOR = "__"


# -- the schema ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One key of the file: its type (``str``, ``int``, ``float``, ``bool``, ``table``,
    ``str-table``: a table of strings, ``str-list``: an array of strings), its default, its
    range (``above``: exclusive minimum) or choices, and what it does."""

    name: str
    kind: str
    default: Any
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    choices: tuple[str, ...] | None = None
    required: bool = False

    def expected(self) -> str:
        what = _KIND_WORDS[self.kind]
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.above is not None:
            what += f" > {_num(self.above)}"
        if self.minimum is not None and self.maximum is not None:
            what += f" in {_num(self.minimum)}..{_num(self.maximum)}"
        elif self.minimum is not None:
            what += f" >= {_num(self.minimum)}"
        return what


_KIND_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean (true or false)",
    "table": "a table",
    "str-table": "a table of strings",
    "str-list": "an array of strings",
}

ENDPOINT_KEYS: tuple[Key, ...] = (
    Key("name", "str", None, "the local endpoint's name (A-Z a-z 0-9 _ ~ - and dots)", required=True),
    Key("properties", "table", {}, "public properties, sent to every peer in the handshake"),
)
MANAGER_KEYS: tuple[Key, ...] = (
    Key("heartbeat_interval", "float", 30.0, "seconds between PINGs on every connection", above=0),
    Key(
        "heartbeat_check",
        "float",
        None,
        "seconds between liveness checks (default: the smaller of 5 and heartbeat_interval / 4)",
        above=0,
    ),
    Key("dead_after", "int", 3, "a peer silent for this many heartbeat intervals is dead", minimum=1),
    Key("handshake_timeout", "float", 10.0, "seconds a connection may take to finish its handshake", above=0),
    Key("linger", "float", 5.0, "seconds stop() waits for accepted messages to be sent", minimum=0),
    Key("max_frame_size", "int", fr.MAX_FRAME_SIZE, "the largest frame, in bytes", fr.PREFIX_LEN, fr.MAX_FRAME_SIZE),
    Key("reconnect_min", "float", 0.5, "first reconnect delay of an active connector, seconds", above=0),
    Key("reconnect_max", "float", 30.0, "longest reconnect delay (exponential backoff with jitter)", above=0),
    Key("delivery_workers", "int", 4, "threads delivering received messages to receivers", minimum=1),
    Key("queue_frames", "int", 10_000, "frames queued per connection for delivery", minimum=1),
    Key("queue_bytes", "int", 64 * 1024 * 1024, "bytes queued per connection for delivery", minimum=1),
    Key(
        "identity_map",
        "str-table",
        {},
        "claimed-name prefix to certificate CN, for peers sharing one certificate (docs/security.md)",
    ),
)
DRIVERS_KEYS: tuple[Key, ...] = (
    Key("prefer", "str-table", {}, "scheme = distribution: pin the distribution that serves a scheme"),
    Key("allow", "str-list", None, "only these distributions may serve a scheme"),
    Key("deny", "str-list", [], "these distributions never serve a scheme (nor are imported)"),
    Key(
        "required_drivers",
        "str-list",
        [],
        "schemes (tcp) or distributions (sfm-driver-grpc) that must be usable, or nothing starts",
    ),
    Key("strict", "bool", False, "every installed driver must load, or nothing starts"),
)
CONNECTOR_KEYS: tuple[Key, ...] = (
    Key("url", "str", None, "scheme://host:port[/path][?param=value...]", required=True),
    Key(
        "mode",
        "str",
        None,
        "passive: listen on url; active: connect to it",
        choices=("passive", "active"),
        required=True,
    ),
    Key("params", "table", {}, "driver parameters (docs/configuration.md lists each driver's)"),
    Key("tls", "table", {}, "TLS files and settings of this connector (docs/security.md)"),
)
#: The keys of a connector's ``tls`` table; their types are the core's (driver_params.CORE_PARAMS).
TLS_KEYS = (
    "ca_cert",
    "server_cert",
    "server_key",
    "client_cert",
    "client_key",
    "connection_security",
    "check_hostname",
    "tls_handshake_timeout",
)
TLS_FILES = ("ca_cert", "server_cert", "server_key", "client_cert", "client_key")
SECTIONS: dict[str, tuple[Key, ...]] = {
    "endpoint": ENDPOINT_KEYS,
    "manager": MANAGER_KEYS,
    "drivers": DRIVERS_KEYS,
    "connector": CONNECTOR_KEYS,
}
_CORE = {p.name: p for p in CORE_PARAMS}
#: Keys whose value is a string: from the environment, their text is taken as it is.
_STRING_KEYS = {("endpoint", "name"), ("connector", "url"), ("connector", "mode")}


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# -- problems ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One mistake: the key (``connector[0].params.send_timeout``), what is wrong (what was
    expected and what was found), where: the file and line (or the environment variable or
    command-line option that set it)."""

    key: str
    message: str
    origin: str = "config"
    line: int | None = None

    def __str__(self) -> str:
        where = self.origin if self.line is None else f"{self.origin}:{self.line}"
        return mask(f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}")

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "line": self.line, "origin": self.origin, "message": mask(self.message)}


class ConfigError(CommError):
    """``CommError(BAD_CONFIG)`` for a configuration with mistakes; ``problems`` lists every one."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        self.errors = [str(p) for p in self.problems]
        if len(self.errors) == 1:
            message = self.errors[0]
        else:
            message = f"{len(self.errors)} errors in the configuration:\n  " + "\n  ".join(self.errors)
        super().__init__(CommError.BAD_CONFIG, message)


def _key_name(path: Sequence[Any]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _found(value: Any) -> str:
    """A value as a problem names what was found (PEM contents never shown)."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        if "-----BEGIN" in value:
            return "PEM contents (not shown)"
        return f"string {mask(repr(value))}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, (datetime, date, time)):
        return f"a date/time {value.isoformat()}"
    return type(value).__name__


def _did_you_mean(word: str, known: Iterable[str], cutoff: float = 0.6) -> str:
    close = difflib.get_close_matches(str(word), list(known), n=1, cutoff=cutoff)
    return f"; did you mean {close[0]!r}?" if close else ""


class _Lines:
    """Where a key is in the file's text: found by a scan for its table header and then for
    ``key =`` below it (tomllib gives no positions). Good enough for hand-written files."""

    _HEADER = re.compile(r"^\s*(\[\[?)\s*([^\[\]#]+?)\s*\]\]?\s*(#.*)?$")

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.regions: list[tuple[tuple, int]] = [((), 0)]
        counts: dict[str, int] = {}
        for i, line in enumerate(self.lines):
            m = self._HEADER.match(line)
            if not m:
                continue
            name = tuple(p.strip().strip("\"'") for p in m.group(2).split("."))
            if m.group(1) == "[[" and len(name) == 1:
                counts[name[0]] = counts.get(name[0], -1) + 1
                path: tuple = (name[0], counts[name[0]])
            elif name[0] in counts:
                path = (name[0], counts[name[0]], *name[1:])
            else:
                path = name
            self.regions.append((path, i))

    def find(self, path: Sequence[Any]) -> int | None:
        path = tuple(path)
        spans = []
        for n, (region, start) in enumerate(self.regions):
            end = self.regions[n + 1][1] if n + 1 < len(self.regions) else len(self.lines)
            if path[: len(region)] == region:
                spans.append((region, start, end))
        for region, start, end in sorted(spans, key=lambda s: -len(s[0])):
            if region == path:
                return start + 1 if region else None
            rest = [p for p in path[len(region) :] if isinstance(p, str)]
            for word in reversed(rest):
                pattern = re.compile(r"(^|[\s{,.])[\"']?" + re.escape(word) + r"[\"']?\s*=")
                first = start + 1 if region else start
                for i in range(first, end):
                    if pattern.search(self.lines[i].split("#", 1)[0]):
                        return i + 1
        for region, start, _ in sorted(spans, key=lambda s: -len(s[0])):
            if region:
                return start + 1
        return None


class _Collector:
    """The problems found so far, and where each key came from."""

    def __init__(self, source: str, lines: _Lines | None) -> None:
        self.source = source
        self.lines = lines
        self.problems: list[Problem] = []
        #: Key paths set by the environment or the caller: path -> origin.
        self.origins: dict[tuple, str] = {}

    def add(self, path: Sequence[Any], message: str, origin: str | None = None) -> None:
        path = tuple(path)
        if origin is not None:
            self.problems.append(Problem(_key_name(path), message, origin))
            return
        for n in range(len(path), 0, -1):
            origin = self.origins.get(path[:n])
            if origin is not None:
                self.problems.append(Problem(_key_name(path), message, origin))
                return
        line = self.lines.find(path) if self.lines is not None and path else None
        self.problems.append(Problem(_key_name(path), message, self.source, line))


# -- layers --------------------------------------------------------------------------------


def _env_value(text: str, as_string: bool) -> Any:
    """An environment variable's text as a TOML value (``30``, ``2.5``, ``true``, ``"x"``,
    ``["a", "b"]``); text that is not TOML, or any text for a string key, is a string."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    if as_string and not isinstance(value, str):
        return text
    return value


def env_overrides(environ: Mapping[str, str] | None = None) -> tuple[list[tuple[tuple, Any, str]], list[Problem]]:
    """The overrides environment variables give: ``SFM_<SECTION>__<KEY>[__<KEY>...]``, the
    names upper case, the keys their lower-case form; a connector by its index from 0
    (``SFM_CONNECTOR__0__PARAMS__CONNECT_TIMEOUT=5``). ``(path, value, variable)`` each, and
    the problems of variables that name no section."""
    environ = os.environ if environ is None else environ
    out: list[tuple[tuple, Any, str]] = []
    problems: list[Problem] = []
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or ENV_SEPARATOR not in var[len(ENV_PREFIX) :]:
            continue
        parts = [p.lower() for p in var[len(ENV_PREFIX) :].split(ENV_SEPARATOR)]
        section = parts[0]
        if section not in SECTIONS or len(parts) < 2 or not all(parts):
            hint = _did_you_mean(section.upper(), [s.upper() for s in SECTIONS])
            problems.append(
                Problem(
                    "",
                    f"not a configuration override: expected SFM_<SECTION>__<KEY> with a section of "
                    f"{', '.join(s.upper() for s in SECTIONS)}, found section {section.upper()!r}{hint}",
                    f"environment {var}",
                )
            )
            continue
        path: list[Any] = [section]
        rest = parts[1:]
        if section == "connector":
            if not rest[0].isdigit() or len(rest) < 2:
                problems.append(
                    Problem(
                        "connector",
                        f"expected SFM_CONNECTOR__<INDEX>__<KEY> with an index from 0, found {var}",
                        f"environment {var}",
                    )
                )
                continue
            path.append(int(rest[0]))
            rest = rest[1:]
        path.extend(rest)
        as_string = (
            (len(rest) == 1 and (section, rest[0]) in _STRING_KEYS)
            or (len(rest) == 2 and rest[0] in ("tls", "params") and rest[1] in TLS_FILES)
            or (section == "drivers" and rest[0] == "prefer")
        )
        out.append((tuple(path), _env_value(environ[var], as_string), f"environment {var}"))
    # Connectors in index order, so that SFM_CONNECTOR__2__ may follow SFM_CONNECTOR__1__.
    out.sort(key=lambda o: o[0][1] if o[0][0] == "connector" else -1)
    return out, problems


def _apply(data: dict, overrides: Iterable[tuple[tuple, Any, str]], found: _Collector) -> None:
    """Set each ``(path, value, origin)`` in ``data``, remembering its origin."""
    for path, value, origin in overrides:
        node: Any = data
        ok = True
        for n, part in enumerate(path[:-1]):
            nxt = path[n + 1]
            if isinstance(node, list):
                if part > len(node):
                    found.add(
                        path[: n + 1],
                        f"no connector {part}: there are {len(node)} (indexes from 0); an override may add "
                        f"the next one, {len(node)}, only",
                        origin,
                    )
                    ok = False
                    break
                if part == len(node):
                    node.append({})
                node = node[part]
                continue
            if not isinstance(node, dict):
                ok = False
                break
            child = node.get(part)
            if child is None:
                child = [] if isinstance(nxt, int) else {}
                node[part] = child
            if isinstance(nxt, int) and not isinstance(child, list):
                found.add(path[: n + 1], f"expected an array of tables ([[{part}]]), found {_found(child)}", origin)
                ok = False
                break
            if not isinstance(nxt, int) and not isinstance(child, dict):
                found.add(path[: n + 1], f"expected a table to set {_key_name(path)} in, found {_found(child)}", origin)
                ok = False
                break
            node = child
        if ok and isinstance(node, dict):
            node[path[-1]] = value
            found.origins[tuple(path)] = origin


# -- the parsed configuration --------------------------------------------------------------


@dataclass
class ConnectorConfig:
    """One connector: its URL, mode, and the params ``add_connector`` gets (the ``params``
    and ``tls`` tables merged, relative TLS paths made absolute)."""

    url: str
    mode: Mode
    params: dict = field(default_factory=dict)


@dataclass
class Config:
    """A checked configuration; :meth:`build` makes the ConnManager it describes."""

    name: str
    properties: dict = field(default_factory=dict)
    manager: dict = field(default_factory=dict)
    drivers: dict = field(default_factory=dict)
    connectors: list[ConnectorConfig] = field(default_factory=list)
    registry: DriverRegistry | None = None
    source: str = "config"

    def build(self, registry: DriverRegistry | None = None) -> tuple[ConnManager, list[str]]:
        """A ConnManager with every connector added (not started), and the connector handles."""
        registry = registry or self.registry or get_registry()
        manager = ConnManager(Endpoint(self.name, self.properties), registry=registry, **self.manager)
        handles = []
        try:
            for c in self.connectors:
                handles.append(manager.add_connector(c.url, dict(c.params), c.mode))
        except CommError as e:
            manager.stop()
            raise CommError(e.code, mask(f"{self.source}: {e.message}")) from None
        return manager, handles


def load_config(
    source: str | Path | Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Iterable[tuple[tuple, Any, str]] = (),
    connectors: Iterable[Mapping[str, Any]] = (),
    registry: DriverRegistry | None = None,
) -> Config:
    """Read, merge and check a configuration: a TOML file (or a mapping already loaded),
    then the environment (``environ``, default ``os.environ``; ``{}`` for none), then
    ``overrides`` (``(path, value, origin)``, e.g. ``(("endpoint", "name"), "x", "--name")``)
    and ``connectors`` added after the file's. Raises :class:`ConfigError` listing every
    mistake."""
    config, problems = check_config(
        source, environ=environ, overrides=overrides, connectors=connectors, registry=registry
    )
    if problems or config is None:
        raise ConfigError(problems)
    return config


def parse_config(data: Mapping[str, Any], source: str = "config") -> Config:
    """Check a configuration already loaded as a dict (no environment); see :func:`load_config`."""
    config, problems = check_config(data, environ={}, source_name=source)
    if problems or config is None:
        raise ConfigError(problems)
    return config


def check_config(
    source: str | Path | Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Iterable[tuple[tuple, Any, str]] = (),
    connectors: Iterable[Mapping[str, Any]] = (),
    registry: DriverRegistry | None = None,
    source_name: str | None = None,
) -> tuple[Config | None, list[Problem]]:
    """:func:`load_config` without raising: the configuration (None if it has mistakes) and
    every problem found. Starts nothing; imports the drivers the connectors name."""
    base = Path.cwd()
    lines = None
    if isinstance(source, Mapping):
        name = source_name or "config"
        data = _copy(source)
    else:
        path = Path(source)
        name = str(path)
        base = path.resolve().parent
        try:
            text = path.read_text()
        except OSError as e:
            return None, [Problem("", f"cannot read: {e.strerror}", name)]
        except UnicodeDecodeError as e:
            return None, [Problem("", f"not UTF-8 text: {e.reason}", name)]
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            line = re.search(r"line (\d+)", str(e))
            return None, [Problem("", f"not valid TOML: {e}", name, int(line.group(1)) if line else None)]
        lines = _Lines(text)
    found = _Collector(name, lines)
    env, env_problems = env_overrides(environ)
    found.problems.extend(env_problems)
    _apply(data, env, found)
    _apply(data, overrides, found)
    for item in connectors:
        data.setdefault("connector", [])
        if isinstance(data["connector"], list):
            index = len(data["connector"])
            data["connector"].append(dict(item))
            found.origins[("connector", index)] = str(item.get("origin", "command line"))
            data["connector"][index].pop("origin", None)
    config = _check(data, found, base, registry)
    return (None if found.problems else config), found.problems


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


# -- the checks ----------------------------------------------------------------------------


def _typed(value: Any, key: Key, path: tuple, found: _Collector) -> bool:
    """Whether ``value`` fits ``key``; if not, a problem naming what was expected and found."""
    kind = key.kind
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "table": isinstance(value, dict),
        "str-table": isinstance(value, dict) and all(isinstance(v, str) for v in value.values()),
        "str-list": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[kind]
    if not ok:
        if kind == "str-table" and isinstance(value, dict):
            bad = next(k for k, v in value.items() if not isinstance(v, str))
            found.add((*path, bad), f"expected a string, found {_found(value[bad])}")
        elif kind == "str-list" and isinstance(value, list):
            bad = next(i for i, v in enumerate(value) if not isinstance(v, str))
            found.add(path, f"expected {key.expected()}, found {_found(value[bad])} at index {bad}")
        else:
            found.add(path, f"expected {key.expected()}, found {_found(value)}")
        return False
    if kind == "float" and not math.isfinite(value):
        found.add(path, f"expected a finite number, found {_found(value)}")
        return False
    if key.choices is not None and value not in key.choices:
        found.add(path, f"expected {key.expected()}, found {_found(value)}{_did_you_mean(value, key.choices)}")
        return False
    too_low = (key.above is not None and value <= key.above) or (key.minimum is not None and value < key.minimum)
    if too_low or (key.maximum is not None and value > key.maximum):
        found.add(path, f"out of range: expected {key.expected()}, found {_found(value)}")
        return False
    return True


def _table(data: Mapping[str, Any], keys: Sequence[Key], path: tuple, found: _Collector) -> dict[str, Any]:
    """The keys of one table that are right (typed); a problem for each unknown, missing or
    wrong one."""
    by_name = {k.name: k for k in keys}
    out: dict[str, Any] = {}
    for name, value in data.items():
        key = by_name.get(name)
        if key is None:
            known = ", ".join(by_name)
            found.add((*path, name), f"unknown key; expected one of {known}{_did_you_mean(name, by_name)}")
        elif _typed(value, key, (*path, name), found):
            out[name] = value
    for key in keys:
        if key.required and key.name not in data:
            found.add(path, f"missing {key.name!r}: expected {key.expected()} ({key.doc})")
    return out


def _section(data: Mapping[str, Any], name: str, found: _Collector) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        found.add((name,), f"expected a table ([{name}]), found {_found(value)}")
        return {}
    return value


def _check(data: dict, found: _Collector, base: Path, registry: DriverRegistry | None) -> Config | None:
    for name in data:
        if name not in SECTIONS:
            found.add(
                (name,),
                f"unknown section; expected one of {', '.join(SECTIONS)}{_did_you_mean(name, SECTIONS)}",
            )
    endpoint = _table(_section(data, "endpoint", found), ENDPOINT_KEYS, ("endpoint",), found)
    name = endpoint.get("name")
    if name is not None:
        try:
            validate_endpoint_name(name)
        except CommError as e:
            found.add(("endpoint", "name"), f"{e.message}")
            name = None
    properties = endpoint.get("properties", {})
    _sendable(properties, ("endpoint", "properties"), found)

    manager = _table(_section(data, "manager", found), MANAGER_KEYS, ("manager",), found)
    if manager.get("reconnect_min", 0.5) > manager.get("reconnect_max", 30.0):
        found.add(
            ("manager", "reconnect_min"),
            f"expected at most reconnect_max ({manager.get('reconnect_max', 30.0)}), found {manager['reconnect_min']}"
            if "reconnect_min" in manager
            else "reconnect_max is below the default reconnect_min (0.5)",
        )

    drivers = _drivers(_section(data, "drivers", found), found)
    registry = _registry(drivers, registry, found)

    items = data.get("connector", [])
    connectors: list[ConnectorConfig] = []
    if not isinstance(items, list):
        found.add(("connector",), f"expected connectors as [[connector]] tables, found {_found(items)}")
        items = []
    for i, item in enumerate(items):
        connector = _connector(item, ("connector", i), found, base, registry, manager)
        if connector is not None:
            connectors.append(connector)
    if not items:
        found.add((), "no [[connector]]: nothing to listen on or connect to")
    if name is None:
        return None
    return Config(name, dict(properties), manager, drivers, connectors, registry, found.source)


def _sendable(value: Any, path: tuple, found: _Collector) -> None:
    """Properties go to peers in a msgpack map: TOML dates and times cannot."""
    if isinstance(value, dict):
        for k, v in value.items():
            _sendable(v, (*path, k), found)
    elif isinstance(value, list):
        for v in value:
            _sendable(v, path, found)
    elif isinstance(value, (datetime, date, time)):
        found.add(path, f"expected a string, number, boolean, array or table, found {_found(value)}")


def _drivers(section: dict[str, Any], found: _Collector) -> dict[str, Any]:
    """The [drivers] table; a string value under a scheme's name is a pin (``tcp = "dist"``,
    the same as ``prefer = { tcp = "dist" }``)."""
    keys = {k.name for k in DRIVERS_KEYS}
    pins = {k: v for k, v in section.items() if k not in keys and isinstance(v, str) and k in _known_schemes()}
    rest = {k: v for k, v in section.items() if k not in pins}
    out = _table(rest, DRIVERS_KEYS, ("drivers",), found)
    if pins:
        out["prefer"] = {**pins, **out.get("prefer", {})}
    return out


def _known_schemes(registry: DriverRegistry | None = None) -> set[str]:
    try:
        installed = set((registry or get_registry()).schemes())
    except Exception:
        installed = set()
    return installed | set(OFFICIAL_PACKAGES)


def _registry(drivers: dict[str, Any], registry: DriverRegistry | None, found: _Collector) -> DriverRegistry:
    """The registry the connectors resolve through: the caller's (with the selection added),
    or a new one when the file selects drivers (the process-wide one is left alone)."""
    allow, deny = drivers.get("allow"), drivers.get("deny", [])
    if registry is None:
        if allow is None and not deny and not drivers.get("prefer"):
            registry = get_registry()
        else:
            registry = DriverRegistry(allow=allow, deny=deny)
    else:
        if allow is not None:
            registry.allow(*allow)
        if deny:
            registry.deny(*deny)
    entries = registry.entries()
    schemes = {e.scheme for e in entries}
    for scheme, dist in drivers.get("prefer", {}).items():
        claims = [e for e in entries if e.scheme == scheme.lower()]
        mine = [e for e in claims if normalize_name(e.distribution) == normalize_name(dist)]
        path = ("drivers", "prefer", scheme)
        if mine and mine[0].status != "denied":
            registry.prefer(scheme, dist)  # only a pin that can be honoured (a bad one is reported)
        if not claims:
            found.add(
                path,
                f"no installed distribution serves scheme {scheme!r}; expected one of "
                f"{', '.join(sorted(schemes)) or 'none'}{_did_you_mean(scheme, schemes | set(OFFICIAL_PACKAGES))}",
            )
        elif not mine:
            found.add(
                path,
                f"expected a distribution that serves {scheme!r} ({', '.join(e.distribution for e in claims)}), "
                f"found {dist!r}, which does not",
            )
        elif mine[0].status == "denied":
            found.add(path, f"{dist!r} is {mine[0].error}")
    missing = []
    for want in drivers.get("required_drivers", []):
        if _is_distribution(want):
            mine = [e for e in entries if normalize_name(e.distribution) == normalize_name(want)]
            if not mine:
                missing.append(f"{want} (not installed: pip install {want})")
            elif all(e.status == "denied" for e in mine):
                missing.append(f"{want} ({mine[0].error})")
            continue
        try:
            registry.get_driver_class(want)
        except CommError as e:
            missing.append(f"{want} ({e.message})")
    if missing:
        found.add(("drivers", "required_drivers"), "not usable: " + "; ".join(missing))
    if drivers.get("strict"):
        try:
            loaded = registry.load_all()
        except CommError:
            loaded = registry.entries()
        bad = [e for e in loaded if e.status in ("failed", "incompatible")]
        if bad:
            found.add(
                ("drivers", "strict"),
                "strict, and a driver failed to load: "
                + "; ".join(f"{e.scheme} from {e.label}: {e.error}" for e in bad),
            )
    return registry


def _is_distribution(name: str) -> bool:
    """A ``required_drivers`` entry names a distribution (``sfm-driver-grpc``), not a scheme."""
    return normalize_name(name) in set(OFFICIAL_PACKAGES.values()) or any(c in name for c in "-_.")


def _port_text(url: str) -> str | None:
    """The port as written in ``url`` (None: none), so a bad one can be quoted."""
    netloc = urlsplit(url).netloc.rpartition("@")[2]
    if netloc.startswith("["):
        tail = netloc.partition("]")[2]
        return tail[1:] if tail.startswith(":") else None
    host, sep, port = netloc.rpartition(":")
    return port if sep and host.count(":") == 0 else None


def _connector(
    item: Any,
    path: tuple,
    found: _Collector,
    base: Path,
    registry: DriverRegistry,
    manager: Mapping[str, Any],
) -> ConnectorConfig | None:
    if not isinstance(item, dict):
        found.add(path, f"expected a table ([[connector]]), found {_found(item)}")
        return None
    fields = _table(item, CONNECTOR_KEYS, path, found)
    url, mode_text = fields.get("url"), fields.get("mode")
    params_given = dict(fields.get("params", {}))
    tls_given = dict(fields.get("tls", {}))
    # Where each param came from, so that a driver's message is pinned to a key.
    where: dict[str, tuple] = {}
    for key in tls_given:
        if key not in TLS_KEYS:
            found.add(
                (*path, "tls", key),
                f"unknown TLS key; expected one of {', '.join(TLS_KEYS)}{_did_you_mean(key, TLS_KEYS)}",
            )
        elif key in params_given:
            found.add((*path, "tls", key), f"given twice: in tls and in params (found {_found(params_given[key])})")
        where[key] = (*path, "tls", key)
    tls_given = {k: v for k, v in tls_given.items() if k in TLS_KEYS}
    for key in params_given:
        where[key] = (*path, "params", key)
    if url is None or mode_text is None:
        return None
    url_path = (*path, "url")
    if "://" not in url:
        found.add(url_path, f"expected a URL like tcp://host:8002, found {_found(url)}")
        return None
    port = _port_text(url)
    if port is not None and port != "" and (not port.isdigit() or int(port) > 65535):
        found.add(url_path, f"port out of range: expected 0..65535, found {port!r} in {url}")
        return None
    try:
        from_url = parse_url(url)
    except CommError as e:
        found.add(url_path, str(e.message))
        return None
    for key in from_url:
        if key not in ("scheme", "url", "host", "port", "path"):
            where.setdefault(key, url_path)
    mode = Mode(mode_text)
    params = {**from_url, **tls_given, **params_given}
    scheme = params["scheme"]
    try:
        driver = registry.create_driver(scheme)
    except CommError as e:
        hint = "" if OFFICIAL_PACKAGES.get(scheme) else _did_you_mean(scheme, _known_schemes(registry))
        found.add(url_path, f"{e.message}{hint}")
        return None
    # A port out of range given as a param, and a URL without a port (caught now, not at connect).
    # A transport without ports (a socket file) says so with a listen_url template (sfm_core/listen_url.py).
    if "port" in params_given or _portless(driver):
        pass  # the driver's own check names a bad one
    elif from_url.get("port") is None:
        found.add(
            url_path, f"expected a port in the URL (e.g. {scheme}://{from_url.get('host') or 'HOST'}:8002), found none"
        )
    elif from_url["port"] == 0 and mode == Mode.ACTIVE:
        found.add(
            url_path, "expected the port the peer listens on, found port 0 (an active connector needs a real one)"
        )
    unreadable = _tls_files(params, where, base, found, url_path)
    params.setdefault("max_frame_size", manager.get("max_frame_size", fr.MAX_FRAME_SIZE))
    for message in connector_errors(driver, params, mode):
        if any(p in message for p in unreadable):
            continue  # already reported by name
        found.add(_pin(message, where, url_path), message)
    return ConnectorConfig(url, mode, {k: v for k, v in params.items() if k in params_given or k in tls_given})


def _portless(driver: Any) -> bool:
    try:
        return bool(driver.capabilities().get("listen_url"))
    except Exception:
        return False


def _tls_files(params: dict, where: dict[str, tuple], base: Path, found: _Collector, url_path: tuple) -> list[str]:
    """Relative TLS file paths made relative to the config file's directory, and a problem
    for each file that cannot be read (its path named, its contents never)."""
    unreadable = []
    for key in TLS_FILES:
        value = params.get(key)
        if not isinstance(value, str) or not value:
            continue
        at = where.get(key, url_path)
        if "-----BEGIN" in value:
            found.add(at, "expected the path of a PEM file, found PEM contents (not shown)")
            unreadable.append("-----BEGIN")
            continue
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = base / path
        params[key] = str(path)
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            found.add(at, f"expected a readable PEM file, found {str(path)!r}: {e.strerror}")
            unreadable.append(str(path))
    return unreadable


def _pin(message: str, where: Mapping[str, tuple], default: tuple) -> tuple:
    """The key a driver's message is about: the first of the connector's params it names."""
    best: tuple[int, tuple] | None = None
    for key, path in where.items():
        m = re.search(r"(?<![A-Za-z0-9_])" + re.escape(key) + r"(?![A-Za-z0-9_])", message)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), path)
    return best[1] if best else default


# -- building ------------------------------------------------------------------------------


def manager_from_config(
    source: str | Path | Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
    registry: DriverRegistry | None = None,
) -> ConnManager:
    """What :meth:`ConnManager.from_config` does: the manager the configuration describes,
    every connector added, not started."""
    manager, _ = load_config(source, environ=environ, registry=registry).build()
    return manager
