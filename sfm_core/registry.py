"""Drivers by URL scheme: discovered from entry points, or registered in-process.

Listing schemes reads package metadata only; a driver module is imported the first time its
scheme is resolved. Rules when several distributions claim one scheme (documented in
docs/plugins.md):

1. a driver registered in-process with :meth:`DriverRegistry.register` wins;
2. then an explicit choice: :meth:`DriverRegistry.prefer`, or the ``SFM_DRIVERS``
   environment variable (``"tcp=my-dist,grpc=other-dist"``);
3. then the distribution sfm ships for that scheme (``sfm-driver-tcp`` for ``tcp``, ...);
4. then the distribution whose name sorts first.

Only distributions that the allow- and deny-lists permit take part (``SFM_DRIVERS_ALLOW``,
``SFM_DRIVERS_DENY``, ``DriverRegistry(allow=..., deny=...)``); the others are reported as
denied and never imported. Distribution names compare as packaging normalizes them (PEP 503:
``SFM_Driver.X`` is ``sfm-driver-x``) everywhere: preferences, the lists, the official names.

When several permitted distributions claim a scheme, the others are reported as shadowed
(``sfm drivers``) and a WARNING naming them all, the one chosen and the rule that chose it
is logged when the scheme is resolved (once per choice). :meth:`DriverRegistry.explain`
gives the same account line by line.

A loaded driver class must be a concrete :class:`~sfm_core.driver.Driver` subclass and fit a
driver contract version in :data:`DRIVER_CONTRACT_VERSIONS` (it declares one with
``SFM_DRIVER_CONTRACT``; none declared is version 1). Otherwise its entry is ``failed`` or
``incompatible`` and resolving its scheme raises ``CommError``; every other driver keeps
working, unless strict mode (``SFM_DRIVERS_STRICT=1``, ``DriverRegistry(strict=True)``) makes
:meth:`DriverRegistry.load_all` raise for it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import importlib_metadata

from .driver import Driver
from .errors import CommError
from .plugins import broadcast, get_plugin_manager, register_driver_modules

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "sfm.drivers"
PREFERENCE_ENV = "SFM_DRIVERS"
ALLOW_ENV = "SFM_DRIVERS_ALLOW"
DENY_ENV = "SFM_DRIVERS_DENY"
STRICT_ENV = "SFM_DRIVERS_STRICT"

#: The driver contract versions this core supports (the contract of ``sfm_core/driver.py``).
DRIVER_CONTRACT_VERSIONS: tuple[int, ...] = (1,)
#: Where a driver declares the contract version it was written for: a class attribute of the
#: driver class, or a module attribute of the module its entry point names or of the module
#: that defines the class (the first found, in that order).
CONTRACT_ATTRIBUTE = "SFM_DRIVER_CONTRACT"
#: The version a driver that declares none is taken as (drivers written before versioning).
UNDECLARED_CONTRACT = 1

#: The distribution sfm publishes for each scheme, named in "no driver" errors.
OFFICIAL_PACKAGES = {
    "tcp": "sfm-driver-tcp",
    "stcp": "sfm-driver-tcp",
    "grpc": "sfm-driver-grpc",
    "grpcs": "sfm-driver-grpc",
    "ws": "sfm-driver-websocket",
    "wss": "sfm-driver-websocket",
    "http": "sfm-driver-websocket",
    "https": "sfm-driver-websocket",
}

IN_PROCESS = "<in-process>"

#: Load states of an entry; :meth:`DriverRegistry.entries` may report "shadowed" or "denied".
NOT_LOADED, OK, FAILED, INCOMPATIBLE, SHADOWED, DENIED = (
    "not loaded",
    "ok",
    "failed",
    "incompatible",
    "shadowed",
    "denied",
)

_NAME_RUNS = re.compile(r"[-_.]+")


def normalize_name(name: str) -> str:
    """A distribution name as packaging compares it (PEP 503): lowercase, runs of ``-_.`` as ``-``."""
    return _NAME_RUNS.sub("-", name.strip()).lower()


@dataclass
class DriverEntry:
    """One claim on a scheme: where it comes from and, once loaded, its class or error.

    ``status`` is one of "not loaded", "ok", "failed" (the import failed, or the entry point
    is not a concrete Driver subclass), "incompatible" (it declares a driver contract version
    this core does not support), "shadowed" (another claim was chosen) or "denied" (the
    allow/deny lists exclude its distribution); ``error`` says why for the last three.
    ``contract`` is the driver contract version it was taken as, once loaded; ``notes`` are
    remarks for ``sfm drivers`` (e.g. that it declares no contract version).
    """

    scheme: str
    distribution: str
    version: str
    target: str
    status: str = NOT_LOADED
    error: str | None = None
    driver_class: type[Driver] | None = None
    shadowed_by: str | None = None
    contract: int | None = None
    notes: list[str] = field(default_factory=list)
    _entry_point: object = field(default=None, repr=False)
    #: What loading gave (not loaded, ok, failed, incompatible), whatever the choice.
    _loaded: str = field(default=NOT_LOADED, repr=False)
    _load_error: str | None = field(default=None, repr=False)
    #: The CommError code resolving this entry raises when it is not usable.
    _error_code: str = field(default=CommError.NOT_SUPPORTED, repr=False)

    @property
    def label(self) -> str:
        """``distribution version``, as messages name an entry."""
        return f"{self.distribution} {self.version}".strip()

    def describe(self) -> dict:
        """A plain dict for ``sfm drivers --json``."""
        cls = self.driver_class
        caps = None
        if cls is not None:
            try:
                caps = cls.capabilities()
            except Exception as e:  # a driver bug is reported, not raised
                caps = {"error": f"{type(e).__name__}: {e}"}
        return {
            "scheme": self.scheme,
            "distribution": self.distribution,
            "version": self.version,
            "target": self.target,
            "driver_class": f"{cls.__module__}.{cls.__qualname__}" if cls else None,
            "capabilities": caps,
            "status": self.status,
            "error": self.error,
            "shadowed_by": self.shadowed_by,
            "contract": self.contract,
            "notes": list(self.notes),
        }


@dataclass
class _Choice:
    """How a scheme resolves now: the entry chosen (or None), the rule, who is denied and why."""

    entry: DriverEntry | None
    rule: str
    claims: list[DriverEntry]
    denied: dict[int, str]
    notes: list[str]

    def permitted(self) -> list[DriverEntry]:
        return [e for e in self.claims if id(e) not in self.denied]


def _env_preferences() -> dict[str, str]:
    prefs = {}
    for item in os.environ.get(PREFERENCE_ENV, "").split(","):
        scheme, sep, dist = item.partition("=")
        if sep and scheme.strip() and dist.strip():
            prefs[scheme.strip().lower()] = dist.strip()
    return prefs


def _names(items: Iterable[str]) -> set[str]:
    return {normalize_name(n) for n in items if n and n.strip()}


def _env_names(var: str) -> set[str]:
    return _names(os.environ.get(var, "").split(","))


class DriverRegistry:
    """Resolves URL schemes to driver classes.

    ``allow``: if given, only these distributions may serve a scheme (``SFM_DRIVERS_ALLOW``,
    when set, must also list them); ``deny``: these never do (nor those in
    ``SFM_DRIVERS_DENY``); a deny wins over an allow. Names are normalized (PEP 503). The lists
    do not apply to drivers registered in-process. ``strict``: :meth:`load_all` raises when a
    driver fails to load (None: ``SFM_DRIVERS_STRICT`` decides). The environment is read at
    each resolution.
    """

    def __init__(
        self,
        group: str = ENTRY_POINT_GROUP,
        *,
        allow: Iterable[str] | None = None,
        deny: Iterable[str] = (),
        strict: bool | None = None,
    ) -> None:
        self.group = group
        self._lock = threading.RLock()
        self._claims: dict[str, list[DriverEntry]] | None = None
        self._plugin_entries: dict[tuple[str, str, int], DriverEntry] = {}
        self._in_process: dict[str, DriverEntry] = {}
        self._preferences: dict[str, str] = {}
        self._allow: set[str] | None = None if allow is None else _names(allow)
        self._deny: set[str] = _names(deny)
        self._strict = strict
        #: What was already warned about: (scheme, distribution chosen, rule) or (scheme, "", note).
        self._warned: set[tuple[str, str, str]] = set()

    # -- discovery (metadata only) -------------------------------------------------------

    def _discover(self) -> dict[str, list[DriverEntry]]:
        with self._lock:
            if self._claims is None:
                claims: dict[str, list[DriverEntry]] = {}
                for ep, name, version in _group_entry_points(self.group):
                    entry = DriverEntry(
                        scheme=ep.name.lower(), distribution=name, version=version, target=ep.value, _entry_point=ep
                    )
                    same = claims.setdefault(entry.scheme, [])
                    # The same distribution can be visible twice (e.g. editable + site); keep one.
                    key = normalize_name(entry.distribution)
                    if not any(normalize_name(e.distribution) == key for e in same):
                        same.append(entry)
                self._claims = claims
            contributed = self._contributed()
            if not contributed:
                return self._claims
            merged = {scheme: list(entries) for scheme, entries in self._claims.items()}
            for entry in contributed:
                merged.setdefault(entry.scheme, []).append(entry)
            return merged

    def _contributed(self) -> list[DriverEntry]:
        """Claims of plugins implementing ``sfm_driver_classes``, asked each time (a plugin
        may be registered at any moment); each plugin's claim keeps its entry, and its load
        state, across calls. A plugin whose hook fails is logged and skipped."""
        found: list[DriverEntry] = []
        for impl in get_plugin_manager().hook.sfm_driver_classes.get_hookimpls():
            label = f"plugin:{impl.plugin_name}"
            try:
                classes = list((impl.function() or {}).items())
            except Exception as e:
                log.warning("%s: sfm_driver_classes failed: %s: %s", label, type(e).__name__, e)
                continue
            for scheme, cls in classes:
                key = (label, str(scheme).lower(), id(cls))
                entry = self._plugin_entries.get(key)
                if entry is None:
                    target = f"{getattr(cls, '__module__', '?')}:{getattr(cls, '__qualname__', cls)}"
                    entry = DriverEntry(str(scheme).lower(), label, "", target, _entry_point=_Contributed(cls))
                    self._plugin_entries[key] = entry
                found.append(entry)
        return found

    def refresh(self) -> None:
        """Forget what was discovered (after installing a package at run time)."""
        with self._lock:
            self._claims = None
            self._warned.clear()

    def _denied_reason(self, distribution: str) -> str | None:
        """Why the allow/deny lists exclude ``distribution``, or None if they permit it."""
        key = normalize_name(distribution)
        if key in self._deny:
            return "in the deny list of DriverRegistry.deny()"
        if key in _env_names(DENY_ENV):
            return f"in {DENY_ENV}"
        if self._allow is not None and key not in self._allow:
            return "not in the allow list of DriverRegistry.allow()"
        env_allow = _env_names(ALLOW_ENV)
        if env_allow and key not in env_allow:
            return f"not in the allow list {ALLOW_ENV}"
        return None

    def _choose(self, scheme: str) -> _Choice:
        """Apply the resolution rules (module docstring) to ``scheme``; imports nothing."""
        claims = list(self._discover().get(scheme, []))
        denied = {id(e): r for e in claims if (r := self._denied_reason(e.distribution)) is not None}
        choice = _Choice(None, "", claims, denied, [])
        if scheme in self._in_process:
            choice.entry = self._in_process[scheme]
            choice.rule = "rule 1: registered in-process with DriverRegistry.register()"
            return choice
        permitted = choice.permitted()
        if not permitted:
            choice.rule = "every distribution that claims it is denied" if claims else "no distribution claims it"
            return choice
        wanted, source = self._preferences.get(scheme), "DriverRegistry.prefer()"
        if not wanted:
            wanted, source = _env_preferences().get(scheme), PREFERENCE_ENV
        if wanted:
            key = normalize_name(wanted)
            for entry in permitted:
                if normalize_name(entry.distribution) == key:
                    choice.entry, choice.rule = entry, f"rule 2: chosen with {source}"
                    return choice
            denied_one = next((e for e in claims if normalize_name(e.distribution) == key), None)
            if denied_one is not None:
                choice.notes.append(
                    f"preferred distribution {wanted!r} ({source}) for scheme {scheme!r} is denied: "
                    f"{denied[id(denied_one)]}"
                )
            else:
                choice.notes.append(
                    f"preferred distribution {wanted!r} ({source}) for scheme {scheme!r} is not installed"
                )
        if len(permitted) == 1:
            choice.entry = permitted[0]
            choice.rule = (
                "the only permitted distribution that claims it" if denied else "the only distribution that claims it"
            )
            return choice
        official = OFFICIAL_PACKAGES.get(scheme)
        if official:
            for entry in permitted:
                if normalize_name(entry.distribution) == official:
                    choice.entry = entry
                    choice.rule = f"rule 3: the official package sfm publishes for {scheme!r}"
                    return choice
        choice.entry = sorted(permitted, key=lambda e: normalize_name(e.distribution))[0]
        choice.rule = "rule 4: the distribution whose name sorts first"
        return choice

    def _warn_choice(self, scheme: str, choice: _Choice) -> None:
        """Log, once per choice, the notes of a resolution and a shared scheme (WARNING)."""
        chosen = choice.entry
        for note in choice.notes:
            key = (scheme, "", note)
            if key not in self._warned:
                self._warned.add(key)
                log.warning("%s", note)
        permitted = choice.permitted()
        if chosen is None or chosen.distribution == IN_PROCESS or len(permitted) < 2:
            return
        key = (scheme, chosen.distribution, choice.rule)
        if key in self._warned:
            return
        self._warned.add(key)
        others = [e.label for e in permitted if e is not chosen]
        log.warning(
            "scheme %r is claimed by %d distributions (%s): using %s (%s); shadowed: %s. Choose with "
            "%s='%s=<distribution>' or DriverRegistry.prefer()",
            scheme,
            len(permitted),
            ", ".join(e.label for e in permitted),
            chosen.label,
            choice.rule,
            ", ".join(others),
            PREFERENCE_ENV,
            scheme,
        )

    def _status(self, entry: DriverEntry, choice: _Choice) -> None:
        """Set ``entry``'s status, error and shadowed_by from the current choice."""
        entry.shadowed_by = None
        if id(entry) in choice.denied:
            entry.status, entry.error = DENIED, f"denied: {choice.denied[id(entry)]}"
        elif choice.entry is not None and entry is not choice.entry:
            entry.status, entry.error = SHADOWED, entry._load_error
            entry.shadowed_by = choice.entry.distribution
        else:
            entry.status, entry.error = entry._loaded, entry._load_error

    def schemes(self) -> list[str]:
        """Every scheme with a driver, without importing any driver (denied ones included)."""
        with self._lock:
            return sorted(set(self._discover()) | set(self._in_process))

    def entries(self) -> list[DriverEntry]:
        """Every claim on every scheme, with shadowed and denied ones marked (imports nothing)."""
        with self._lock:
            out = []
            for scheme in self.schemes():
                choice = self._choose(scheme)
                claims = list(choice.claims)
                if scheme in self._in_process:
                    claims.insert(0, self._in_process[scheme])
                for entry in claims:
                    self._status(entry, choice)
                    out.append(entry)
            return out

    def explain(self, scheme: str, load: bool = False) -> list[str]:
        """How ``scheme`` resolves, in lines: who claims it, which claim is chosen and by which
        rule, and what each other claim is (shadowed, denied, failed, incompatible).

        Imports nothing unless ``load`` is true: then the chosen driver is loaded first, so its
        line says whether it loads and fits the driver contract (for ``sfm drivers --why``).
        """
        scheme = scheme.lower()
        with self._lock:
            choice = self._choose(scheme)
            if load and choice.entry is not None and choice.entry._loaded == NOT_LOADED:
                self._load(choice.entry)
            claims = list(choice.claims)
            if scheme in self._in_process:
                claims.insert(0, self._in_process[scheme])
            if not claims:
                return [
                    f"scheme {scheme!r}: no distribution claims it (known schemes: {self._known()}){_install(scheme)}"
                ]
            lines = [f"scheme {scheme!r}: claimed by " + ", ".join(f"{e.label} ({e.target})" for e in claims)]
            if choice.entry is not None:
                lines.append(f"chosen: {choice.entry.label} ({choice.rule})")
            else:
                lines.append(f"chosen: none ({choice.rule})")
            lines.extend(f"note: {note}" for note in choice.notes)
            for entry in claims:
                self._status(entry, choice)
                if entry.status == SHADOWED:
                    text = f"shadowed by {entry.shadowed_by}"
                elif entry.status == DENIED:
                    text = f"denied ({choice.denied[id(entry)]})"
                elif entry.status == FAILED:
                    text = f"failed to load: {entry.error}"
                elif entry.status == INCOMPATIBLE:
                    text = f"incompatible: {entry.error}"
                else:
                    text = entry.status
                lines.append(f"{entry.label}: {text}" + "".join(f"; {n}" for n in entry.notes))
            return lines

    def _known(self) -> str:
        return ", ".join(self.schemes()) or "none"

    # -- choices -------------------------------------------------------------------------

    def register(self, scheme: str, driver_class: type[Driver]) -> None:
        """Register a driver class for a scheme in this process; it wins over entry points.

        Raises ``CommError`` if it is not a concrete Driver subclass, or declares a driver
        contract version this core does not support.
        """
        what = f"in-process driver for scheme {scheme!r}"
        _check_driver_class(driver_class, what)
        contract, notes = _check_contract(driver_class, (), what)
        entry = DriverEntry(
            scheme=scheme.lower(),
            distribution=IN_PROCESS,
            version="",
            target=f"{driver_class.__module__}:{driver_class.__qualname__}",
            status=OK,
            driver_class=driver_class,
            contract=contract,
            notes=notes,
            _loaded=OK,
        )
        with self._lock:
            self._in_process[entry.scheme] = entry

    def unregister(self, scheme: str) -> None:
        """Undo :meth:`register`."""
        with self._lock:
            self._in_process.pop(scheme.lower(), None)

    def prefer(self, scheme: str, distribution: str) -> None:
        """Choose which installed distribution serves ``scheme`` when several claim it (the
        name is compared normalized, so ``my_dist`` is ``my-dist``)."""
        with self._lock:
            self._preferences[scheme.lower()] = distribution

    def allow(self, *distributions: str) -> None:
        """Add to the allow list: once there is one, only the distributions on it serve schemes."""
        with self._lock:
            self._allow = (self._allow or set()) | _names(distributions)

    def deny(self, *distributions: str) -> None:
        """Add to the deny list: these distributions never serve a scheme (nor are imported).
        A driver already created keeps running; new resolutions skip them."""
        with self._lock:
            self._deny |= _names(distributions)

    @property
    def strict(self) -> bool:
        """Whether :meth:`load_all` raises for a driver that fails to load."""
        if self._strict is not None:
            return self._strict
        return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes", "on")

    # -- resolution ----------------------------------------------------------------------

    def get_driver_class(self, scheme: str) -> type[Driver]:
        """The driver class for ``scheme``, importing its module on first use.

        Raises ``CommError``: NOT_SUPPORTED naming the scheme, the known schemes and what to
        install when nothing claims it; NOT_SUPPORTED naming each claim when the allow/deny
        lists exclude every one; and, naming the scheme, distribution and error, NOT_SUPPORTED
        for a driver whose import failed or that declares an unsupported driver contract
        version, BAD_CONFIG for an entry point that is not a concrete Driver subclass (the
        abstract methods it leaves are named).
        """
        scheme = scheme.lower()
        with self._lock:
            choice = self._choose(scheme)
            self._warn_choice(scheme, choice)
            entry = choice.entry
            if entry is None:
                if choice.claims:
                    denied = ", ".join(f"{e.label} ({choice.denied[id(e)]})" for e in choice.claims)
                    raise CommError(
                        CommError.NOT_SUPPORTED,
                        f"no permitted driver for scheme {scheme!r}: every distribution that claims it is denied: "
                        f"{denied}",
                    )
                raise CommError(
                    CommError.NOT_SUPPORTED,
                    f"no driver for scheme {scheme!r} (known schemes: {self._known()}){_install(scheme)}",
                )
            if entry._loaded == NOT_LOADED:
                self._load(entry)
            if entry.driver_class is None:
                how = "is incompatible" if entry._loaded == INCOMPATIBLE else "failed to load"
                raise CommError(
                    entry._error_code,
                    f"driver for scheme {scheme!r} from {entry.label} {how}: {entry._load_error}",
                )
            return entry.driver_class

    def create_driver(self, scheme: str) -> Driver:
        """A new driver instance for ``scheme``; raises ``CommError`` as :meth:`get_driver_class`
        does, and ``CommError(ERROR)`` naming the distribution if the constructor raises."""
        cls = self.get_driver_class(scheme)
        try:
            return cls()
        except CommError:
            raise
        except Exception as e:  # a driver bug must reach the caller as a CommError
            with self._lock:
                chosen = self._choose(scheme.lower()).entry
            where = chosen.label if chosen is not None else cls.__module__
            raise CommError(
                CommError.ERROR,
                f"driver for scheme {scheme.lower()!r} from {where} could not be created: {type(e).__name__}: {e}",
            ) from e

    def load_all(self) -> list[DriverEntry]:
        """Load every chosen driver (for ``sfm drivers`` and the demo); failures are recorded
        (and logged) in the entries. In strict mode, every chosen driver is still tried, then
        ``CommError(ERROR)`` lists each that failed or is incompatible."""
        with self._lock:
            for scheme in self.schemes():
                choice = self._choose(scheme)
                self._warn_choice(scheme, choice)
                if choice.entry is not None and choice.entry._loaded == NOT_LOADED:
                    self._load(choice.entry)
            entries = self.entries()
        bad = [e for e in entries if e.status in (FAILED, INCOMPATIBLE)]
        if bad and self.strict:
            raise CommError(
                CommError.ERROR,
                f"{len(bad)} driver{'s' if len(bad) > 1 else ''} failed to load (strict mode): "
                + "; ".join(f"{e.scheme} from {e.label}: {e.status}: {e.error}" for e in bad),
            )
        return entries

    def _load(self, entry: DriverEntry) -> None:
        ep = entry._entry_point
        what = f"entry point {entry.scheme} = {entry.target!r} of {entry.distribution}"
        try:
            obj = ep.load()  # type: ignore[attr-defined]
            _check_driver_class(obj, what)
        except (Exception, SystemExit) as e:  # a third-party import's failure, even sys.exit(), is its own
            self._failed(entry, FAILED, e.message if isinstance(e, CommError) else f"{type(e).__name__}: {e}")
            entry._error_code = e.code if isinstance(e, CommError) else CommError.NOT_SUPPORTED
            return
        try:
            entry.contract, entry.notes = _check_contract(obj, (getattr(ep, "module", None),), what)
        except CommError as e:
            self._failed(entry, INCOMPATIBLE, e.message or str(e))
            return
        entry.driver_class = obj
        entry._loaded = entry.status = OK
        register_driver_modules(obj, getattr(ep, "module", None))
        broadcast("sfm_driver_loaded", scheme=entry.scheme, driver_class=obj)

    @staticmethod
    def _failed(entry: DriverEntry, status: str, error: str) -> None:
        entry._loaded = entry.status = status
        entry._load_error = entry.error = error
        entry._error_code = CommError.NOT_SUPPORTED
        log.error("driver for scheme %r from %s %s: %s", entry.scheme, entry.label, _HOW[status], error)


_HOW = {FAILED: "failed to load", INCOMPATIBLE: "is incompatible"}


def _install(scheme: str) -> str:
    hint = OFFICIAL_PACKAGES.get(scheme)
    return f"; install {hint}" if hint else ""


class _Contributed:
    """Stands for the entry point of a driver class a plugin contributed (``sfm_driver_classes``)."""

    module = None

    def __init__(self, cls: Any) -> None:
        self.cls = cls

    def load(self) -> Any:
        return self.cls


def _group_entry_points(group: str) -> list[tuple[Any, str, str]]:
    """``(entry point, distribution name, version)`` for ``group``, package by package: one
    installed package with broken metadata (no ``Name``, a malformed ``entry_points.txt``)
    is logged and skipped, and never hides the drivers of the others."""
    found = []
    for dist in importlib_metadata.distributions():
        try:
            eps = [ep for ep in dist.entry_points if ep.group == group]
            if not eps:
                continue
            name, version = dist.name, dist.version
        except Exception as e:
            where = getattr(dist, "_path", "?")
            log.warning("skipping a package with broken metadata (%s): %s: %s", where, type(e).__name__, e)
            continue
        found += [(ep, name or "<unknown>", version or "") for ep in eps]
    return found


def _check_driver_class(obj: object, what: str) -> None:
    """Raise ``CommError(BAD_CONFIG)`` unless ``obj`` is a Driver subclass one can instantiate."""
    if not (isinstance(obj, type) and issubclass(obj, Driver)):
        raise CommError(CommError.BAD_CONFIG, f"{what} is not a subclass of sfm_core.Driver (got {obj!r})")
    missing = sorted(getattr(obj, "__abstractmethods__", ()))
    if missing:
        raise CommError(
            CommError.BAD_CONFIG,
            f"{what}: {obj.__qualname__} leaves abstract methods unimplemented: {', '.join(missing)}",
        )


_MISSING = object()


def _check_contract(cls: type, modules: Iterable[str | None], what: str) -> tuple[int, list[str]]:
    """The driver contract version ``cls`` declares (see :data:`CONTRACT_ATTRIBUTE`) and notes;
    ``CommError(NOT_SUPPORTED)`` if it is not one of :data:`DRIVER_CONTRACT_VERSIONS`."""
    declared, where = getattr(cls, CONTRACT_ATTRIBUTE, _MISSING), f"{cls.__qualname__}.{CONTRACT_ATTRIBUTE}"
    if declared is _MISSING:
        for name in (*modules, cls.__module__):
            module = sys.modules.get(name) if name else None
            if module is not None and hasattr(module, CONTRACT_ATTRIBUTE):
                declared, where = getattr(module, CONTRACT_ATTRIBUTE), f"{name}.{CONTRACT_ATTRIBUTE}"
                break
    fits = ", ".join(str(v) for v in DRIVER_CONTRACT_VERSIONS)
    if declared is _MISSING:
        note = f"declares no driver contract version ({CONTRACT_ATTRIBUTE}); taken as {UNDECLARED_CONTRACT}"
        return UNDECLARED_CONTRACT, [note]
    if isinstance(declared, bool) or not isinstance(declared, int) or declared not in DRIVER_CONTRACT_VERSIONS:
        raise CommError(
            CommError.NOT_SUPPORTED,
            f"{what} declares driver contract {declared!r} ({where}); this sfm supports driver contract {fits}",
        )
    return declared, []


_default: DriverRegistry | None = None


def get_registry() -> DriverRegistry:
    """The process-wide registry used by ``ConnManager.add_connector`` and the CLI."""
    global _default
    if _default is None:
        _default = DriverRegistry()
    return _default
