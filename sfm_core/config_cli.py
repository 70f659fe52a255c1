"""``sfm config check FILE`` and ``sfm config example [--scheme S]`` (docs/configuration.md)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .config import (
    DRIVERS_KEYS,
    MANAGER_KEYS,
    check_config,
    mask,
)
from .driver import Mode
from .driver_params import CORE_NAMES
from .errors import CommError
from .pki import FILES
from .registry import get_registry
from .tls import SECURE_SCHEMES

#: Where ``sfm config example`` puts the TLS files of a secure scheme, relative to the file.
CERT_DIR = "certs"


def _toml(value: Any) -> str:
    """A value as TOML writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }" if value else "{}"
    return json.dumps(str(value))


def _commented(key: str, value: Any, doc: str, *, width: int = 40) -> str:
    """``# key = default    # doc`` (an unset default: ``# key = ...``)."""
    left = f"# {key} = {'...' if value is None else _toml(value)}"
    return f"{left.ljust(width)}  # {doc}" if doc else left


def example(scheme: str = "tcp") -> str:
    """A commented configuration for a listener on ``scheme`` that ``sfm config check``
    accepts (for a secure scheme, once the TLS files it names exist, in ``certs/`` next to
    it: the names :func:`sfm_core.pki.make_pki` writes)."""
    scheme = scheme.lower()
    driver = get_registry().create_driver(scheme)  # CommError naming what to install
    declared = [p for p in (driver.parameters() or ()) if p.name not in CORE_NAMES or p.name == "path"]
    secure = scheme in SECURE_SCHEMES
    out = [
        "# sfm configuration: one endpoint and its connectors (reference: docs/configuration.md).",
        "# Check it:  sfm config check FILE      Run it:  sfm serve --config FILE",
        "# Environment variables override single keys: SFM_ENDPOINT__NAME=server-2,",
        "# SFM_MANAGER__HEARTBEAT_INTERVAL=10, SFM_CONNECTOR__0__URL=... (values are TOML).",
        "# Lines starting with '# key =' show a key's default; uncomment to change it.",
        "",
        "[endpoint]",
        'name = "server"                           # A-Z a-z 0-9 _ ~ - and dots',
        'properties = { role = "server" }          # public: sent to every peer in the handshake',
        "",
        "[manager]                                 # heartbeats, dead peers, handshake, linger, limits",
    ]
    out += [_commented(k.name, k.default, k.doc) for k in MANAGER_KEYS]
    dist = next((e.distribution for e in get_registry().entries() if e.scheme == scheme), "sfm-driver-x")
    out += ["", "[drivers]                                 # which driver serves a scheme"]
    for k in DRIVERS_KEYS:
        if k.name == "required_drivers":
            out.append(f"required_drivers = {_toml([scheme])}".ljust(40) + f"  # {k.doc}")
        elif k.name == "prefer":
            out.append(_commented(k.name, {scheme: dist}, k.doc))
        elif k.name == "allow":
            out.append(_commented(k.name, [dist], k.doc + " (default: no allow list)"))
        else:
            out.append(_commented(k.name, k.default if k.default is not None else [], k.doc))
    out += [
        "",
        "[[connector]]                             # a listener; add more [[connector]] tables",
        f'url = "{scheme}://0:8002"'.ljust(40) + "  # host 0: every interface; port 0: any free port",
        'mode = "passive"                          # passive: listen; active: connect',
        "",
        "[connector.params]                        # this driver's parameters, with their defaults",
    ]
    for p in declared:
        if Mode.PASSIVE.value in p.modes:
            out.append(_commented(p.name, p.default, p.doc))
    out += [
        _commented("max_connections", 4096, "connections this listener holds at once"),
        _commented("max_handshakes", 256, "connections in their handshake at once"),
    ]
    if secure:
        out += [
            "",
            "[connector.tls]                           # relative paths: from this file's directory",
            f'ca_cert = "{CERT_DIR}/{FILES["ca_cert"]}"',
            f'server_cert = "{CERT_DIR}/{FILES["server_cert"]}"',
            f'server_key = "{CERT_DIR}/{FILES["server_key"]}"',
            _commented("connection_security", "mtls", "mtls, tls (server certificate only) or clear"),
        ]
    else:
        out += ["", "# TLS: use the secure scheme (stcp, grpcs, wss, https) and a [connector.tls] table."]
    out += [
        "",
        "# An active connector, to reach a peer:",
        "# [[connector]]",
        f'# url = "{scheme}://server.example:8002"',
        '# mode = "active"',
    ]
    active = [p for p in declared if Mode.ACTIVE.value in p.modes and Mode.PASSIVE.value not in p.modes]
    if active:
        out.append("# params = { " + ", ".join(f"{p.name} = {_toml(p.default)}" for p in active[:2]) + " }")
    if secure:
        out.append(
            f'# tls = {{ ca_cert = "{CERT_DIR}/{FILES["ca_cert"]}", client_cert = "{CERT_DIR}/{FILES["client_cert"]}", '
            f'client_key = "{CERT_DIR}/{FILES["client_key"]}" }}'
        )
    return "\n".join(out) + "\n"


def cmd_check(args: argparse.Namespace) -> int:
    config, problems = check_config(args.file, environ={} if args.no_env else None)
    if args.json:
        print(
            json.dumps(
                {"file": args.file, "ok": not problems, "errors": [p.as_dict() for p in problems]},
                indent=2,
            )
        )
    elif problems:
        for p in problems:
            print(str(p), file=sys.stderr)
        n = len(problems)
        print(f"sfm config check: {n} error{'s' if n > 1 else ''} in {args.file}", file=sys.stderr)
    else:
        assert config is not None
        conns = ", ".join(mask(f"{c.mode.value} {c.url}") for c in config.connectors)
        print(f"{args.file}: ok: endpoint {config.name}, {len(config.connectors)} connector(s): {conns}")
    return 2 if problems else 0


def cmd_example(args: argparse.Namespace) -> int:
    try:
        text = example(args.scheme)
    except CommError as e:
        print(f"sfm config example: {e.message}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


def add_command(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    """Add ``sfm config`` (``check``, ``example``) to the ``sfm`` subcommands."""
    help = "check a configuration file, or print an example one (docs/configuration.md)"
    p = sub.add_parser("config", help=help, description=help, formatter_class=formatter)
    commands = p.add_subparsers(dest="config_command", required=True, metavar="{check,example}")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        c = commands.add_parser(name, help=help, description=help, formatter_class=formatter)
        c.add_argument(
            "-v", "--verbose", dest="sub_verbose", action="count", default=0, help="log more (-v info, -vv debug)"
        )
        return c

    c = command(
        "check",
        "validate FILE (and the SFM_* environment overrides) without starting anything; every error at once, "
        "each naming the key and line; exit 0 when clean, 2 otherwise",
    )
    c.add_argument("file", metavar="FILE", help="the TOML configuration file")
    c.add_argument("--no-env", action="store_true", help="ignore the SFM_<SECTION>__<KEY> environment overrides")
    c.add_argument("--json", action="store_true", help='{"file", "ok", "errors": [{key, line, origin, message}]}')
    c.set_defaults(func=cmd_check)

    c = command("example", "print a commented example configuration (a listener) that sfm config check accepts")
    c.add_argument("--scheme", default="tcp", help="the listener's scheme")
    c.set_defaults(func=cmd_example)
