"""Declared, typed connector parameters: what a driver takes, checked before anything starts.

A driver lists its parameters once, from :meth:`sfm_core.Driver.parameters`::

    PARAMS = (
        Param("send_timeout", float, 60.0, minimum=0.001, doc="seconds a send may make no progress"),
        Param("backlog", int, 65535, minimum=1, modes=("passive",), doc="listen backlog"),
    )

    class FooDriver(Driver):
        @classmethod
        def parameters(cls):
            return PARAMS

        def listen(self, connector):
            p = parse_params(PARAMS, connector.params, connector.mode, driver="foo driver")
            ... p["backlog"], p["max_frame_size"] ...

``add_connector`` then refuses, as ``CommError(BAD_CONFIG)``, a key nobody declared (with a
"did you mean" when one is close), a value of the wrong type or out of its range, and a
parameter given to the wrong side (a listener's ``backlog`` on an active connector). The
parameters the core owns (:data:`CORE_PARAMS`: the URL parts, ``max_frame_size``, TLS, a
listener's limits) are accepted everywhere without a driver declaring them; a driver may
declare one of them again to give it its own default (``path="/f3"``).

Values come from URL queries (strings) or from code and TOML (typed): both go through
:func:`sfm_core.params.convert`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any

from .driver import Mode
from .errors import CommError
from .frames import MAX_FRAME_SIZE, PREFIX_LEN
from .limits import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_HANDSHAKES
from .params import convert
from .tls import DEFAULT_HANDSHAKE_TIMEOUT, MTLS, SECURITY_MODES

ACTIVE = Mode.ACTIVE.value
PASSIVE = Mode.PASSIVE.value
BOTH = (ACTIVE, PASSIVE)
_SIDE = {ACTIVE: "an active connector", PASSIVE: "a listener (passive)"}
_KIND = {bool: "bool", int: "int", float: "float", str: "str"}


@dataclass(frozen=True)
class Param:
    """One connector parameter: its name, type (``bool``, ``int``, ``float``, ``str``) and
    default (None: not set, the driver decides), the range (inclusive) or the choices of its
    value, the modes it applies to, and one line saying what it does."""

    name: str
    kind: type
    default: Any
    _: KW_ONLY
    minimum: float | None = None
    maximum: float | None = None
    choices: Sequence[str] | None = None
    modes: tuple[str, ...] = BOTH
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in _KIND:
            raise TypeError(f"Param {self.name}: kind must be bool, int, float or str, not {self.kind!r}")
        modes = tuple(Mode(m).value for m in self.modes)
        if not modes:
            raise ValueError(f"Param {self.name}: modes is empty")
        if self.choices is not None and self.kind is not str:
            raise TypeError(f"Param {self.name}: choices need kind str")
        object.__setattr__(self, "modes", modes)

    def expected(self) -> str:
        """What a value must be, in words: ``an int in 16..2145386496``, ``one of mtls, tls, clear``."""
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        what = {
            bool: "a bool (true/false, 1/0, yes/no, on/off)",
            int: "an int",
            float: "a finite float",
            str: "a str",
        }[self.kind]
        if self.minimum is not None and self.maximum is not None:
            return f"{what} in {_num(self.minimum)}..{_num(self.maximum)}"
        if self.minimum is not None:
            return f"{what} >= {_num(self.minimum)}"
        if self.maximum is not None:
            return f"{what} <= {_num(self.maximum)}"
        return what

    def parse(self, value: Any) -> Any:
        """``value`` converted and checked; ``ValueError`` with what is wrong in words.

        None (and, for a str, ``""``) is "not set": the default.
        """
        if value is None or (self.kind is str and value == ""):
            return self.default
        try:
            converted = convert(value, self.kind)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"is not {_article(_KIND[self.kind])}; expected {self.expected()}") from None
        if self.choices is not None:
            converted = converted.strip().lower()
            if converted not in self.choices:
                close = difflib.get_close_matches(converted, self.choices, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"is not one of {', '.join(self.choices)}{hint}")
        if (self.minimum is not None and converted < self.minimum) or (
            self.maximum is not None and converted > self.maximum
        ):
            raise ValueError(f"is out of range; expected {self.expected()}")
        return converted


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


_TLS_FILE = "PEM file: {}"

#: The parameters the core owns: every connector may carry them, no driver declares them.
CORE_PARAMS: tuple[Param, ...] = (
    Param("scheme", str, None, doc="the URL scheme (set by the core)"),
    Param("url", str, None, doc="the connector URL (set by the core from the URL given)"),
    Param("host", str, None, doc="host to connect to, or to bind (0: all interfaces)"),
    Param("port", int, None, minimum=0, maximum=65535, doc="port to connect to, or to bind (0: a free one)"),
    Param("path", str, None, doc="the URL path"),
    Param(
        "max_frame_size",
        int,
        MAX_FRAME_SIZE,
        minimum=PREFIX_LEN,
        maximum=MAX_FRAME_SIZE,
        doc="the largest frame accepted, in bytes (the ConnManager's unless given)",
    ),
    Param(
        "stream_handoff",
        bool,
        True,
        doc="one thread's back-to-back small frames go to the connection's background writer "
        "(docs/architecture.md, Who writes); false: only frames that find a write in progress queue",
    ),
    Param("secure", bool, False, doc="TLS on a plain scheme (the secure schemes always are)"),
    Param("ca_cert", str, None, doc=_TLS_FILE.format("the CA that signs the peer's certificate")),
    Param("server_cert", str, None, doc=_TLS_FILE.format("a listener's certificate")),
    Param("server_key", str, None, doc=_TLS_FILE.format("a listener's private key")),
    Param("client_cert", str, None, doc=_TLS_FILE.format("a connector's certificate (mtls, clear)")),
    Param("client_key", str, None, doc=_TLS_FILE.format("a connector's private key (mtls, clear)")),
    Param(
        "connection_security",
        str,
        MTLS,
        choices=SECURITY_MODES,
        doc="mtls (both sides present certificates, identity binding), tls (the server only), clear",
    ),
    Param("check_hostname", bool, False, doc="a connector checks the server certificate against the host"),
    Param(
        "tls_handshake_timeout",
        float,
        DEFAULT_HANDSHAKE_TIMEOUT,
        minimum=0.001,
        doc="seconds a TLS handshake may take",
    ),
    Param(
        "max_connections",
        int,
        DEFAULT_MAX_CONNECTIONS,
        minimum=1,
        modes=(PASSIVE,),
        doc="connections a listener holds at once (sfm_core.limits)",
    ),
    Param(
        "max_handshakes",
        int,
        DEFAULT_MAX_HANDSHAKES,
        minimum=1,
        modes=(PASSIVE,),
        doc="connections a listener holds in their handshake at once (sfm_core.limits)",
    ),
)
CORE_NAMES = frozenset(p.name for p in CORE_PARAMS)


class ParamError(CommError):
    """``CommError(BAD_CONFIG)`` for one or more bad parameters; ``errors`` lists them all."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        if len(self.errors) == 1:
            message = self.errors[0]
        else:
            message = f"{len(self.errors)} bad parameters: " + "; ".join(self.errors)
        super().__init__(CommError.BAD_CONFIG, message)


def declared_params(declared: Iterable[Param] | None) -> dict[str, Param]:
    """The core's parameters and then a driver's, by name (a driver's own declaration wins)."""
    table = {p.name: p for p in CORE_PARAMS}
    for p in declared or ():
        table[p.name] = p
    return table


def check_params(
    declared: Sequence[Param] | None, params: Mapping[str, Any], mode: Mode | str, *, driver: str
) -> tuple[dict[str, Any], list[str]]:
    """Every declared parameter's value (defaults filled) and every error, in the order of
    ``params``. ``declared`` None (a driver without :meth:`Driver.parameters`): only the
    core's parameters are checked and other keys pass unchecked, as before declarations."""
    side = Mode(mode).value
    table = declared_params(declared)
    values = {name: p.default for name, p in table.items()}
    errors: list[str] = []
    for key, value in params.items():
        p = table.get(key)
        if p is None:
            if declared is not None:
                errors.append(_unknown(key, table, declared, driver))
            continue
        if side not in p.modes:
            errors.append(
                f"{driver}: parameter {key} is for {' and '.join(_SIDE[m] for m in p.modes)} only, not {_SIDE[side]}"
            )
            continue
        try:
            values[key] = p.parse(value)
        except ValueError as e:
            errors.append(f"{driver}: parameter {key}={value!r} {e}")
    return values, errors


def parse_params(
    declared: Sequence[Param] | None, params: Mapping[str, Any], mode: Mode | str, *, driver: str
) -> dict[str, Any]:
    """:func:`check_params`'s values; :class:`ParamError` (``CommError(BAD_CONFIG)``) listing
    every error if there is any."""
    values, errors = check_params(declared, params, mode, driver=driver)
    if errors:
        raise ParamError(errors)
    return values


def _unknown(key: str, table: Mapping[str, Param], declared: Sequence[Param], driver: str) -> str:
    close = difflib.get_close_matches(str(key), list(table), n=1, cutoff=0.75)
    if close:
        return f"{driver}: unknown parameter {key!r}; did you mean {close[0]!r}?"
    own = sorted({p.name for p in declared} - CORE_NAMES)
    known = ", ".join(own) if own else "none of its own"
    core = ", ".join(sorted(CORE_NAMES))
    return f"{driver}: unknown parameter {key!r} (the driver takes {known}; every connector takes {core})"
