"""Drivers by URL scheme: discovered from entry points, or registered in-process.

Listing schemes reads package metadata only; a driver module is imported the first time its
scheme is resolved. Rules when several distributions claim one scheme (documented in
docs/plugins.md):

1. a driver registered in-process with :meth:`DriverRegistry.register` wins;
2. then an explicit choice: :meth:`DriverRegistry.prefer`, or the ``SFM_DRIVERS``
   environment variable (``"tcp=my-dist,grpc=other-dist"``);
3. then the distribution sfm ships for that scheme (``sfm-driver-tcp`` for ``tcp``, ...);
4. then the distribution whose name sorts first.

The others are reported as shadowed (``sfm drivers``) and a warning is logged.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

import importlib_metadata

from .driver import Driver
from .errors import CommError
from .plugins import broadcast, register_module_of

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "sfm.drivers"
PREFERENCE_ENV = "SFM_DRIVERS"

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


@dataclass
class DriverEntry:
    """One claim on a scheme: where it comes from and, once loaded, its class or error."""

    scheme: str
    distribution: str
    version: str
    target: str
    status: str = "not loaded"  # "ok", "failed", "shadowed", "not loaded"
    error: str | None = None
    driver_class: type[Driver] | None = None
    shadowed_by: str | None = None
    _entry_point: object = field(default=None, repr=False)

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
        }


def _env_preferences() -> dict[str, str]:
    prefs = {}
    for item in os.environ.get(PREFERENCE_ENV, "").split(","):
        scheme, sep, dist = item.partition("=")
        if sep and scheme.strip() and dist.strip():
            prefs[scheme.strip().lower()] = dist.strip()
    return prefs


class DriverRegistry:
    """Resolves URL schemes to driver classes."""

    def __init__(self, group: str = ENTRY_POINT_GROUP) -> None:
        self.group = group
        self._lock = threading.RLock()
        self._claims: dict[str, list[DriverEntry]] | None = None
        self._in_process: dict[str, DriverEntry] = {}
        self._preferences: dict[str, str] = {}

    # -- discovery (metadata only) -------------------------------------------------------

    def _discover(self) -> dict[str, list[DriverEntry]]:
        with self._lock:
            if self._claims is None:
                claims: dict[str, list[DriverEntry]] = {}
                for ep in importlib_metadata.entry_points(group=self.group):
                    dist = getattr(ep, "dist", None)
                    entry = DriverEntry(
                        scheme=ep.name.lower(),
                        distribution=dist.name if dist is not None else "<unknown>",
                        version=dist.version if dist is not None else "",
                        target=ep.value,
                        _entry_point=ep,
                    )
                    same = claims.setdefault(entry.scheme, [])
                    # The same distribution can be visible twice (e.g. editable + site); keep one.
                    if not any(e.distribution == entry.distribution for e in same):
                        same.append(entry)
                self._claims = claims
            return self._claims

    def refresh(self) -> None:
        """Forget what was discovered (after installing a package at run time)."""
        with self._lock:
            self._claims = None

    def _chosen(self, scheme: str) -> DriverEntry | None:
        if scheme in self._in_process:
            return self._in_process[scheme]
        claims = self._discover().get(scheme)
        if not claims:
            return None
        if len(claims) == 1:
            return claims[0]
        wanted = self._preferences.get(scheme) or _env_preferences().get(scheme)
        if wanted:
            for entry in claims:
                if entry.distribution == wanted:
                    return entry
            log.warning("preferred distribution %r for scheme %r is not installed", wanted, scheme)
        official = OFFICIAL_PACKAGES.get(scheme)
        for entry in claims:
            if entry.distribution == official:
                return entry
        return sorted(claims, key=lambda e: e.distribution)[0]

    def schemes(self) -> list[str]:
        """Every scheme with a driver, without importing any driver."""
        with self._lock:
            return sorted(set(self._discover()) | set(self._in_process))

    def entries(self) -> list[DriverEntry]:
        """Every claim on every scheme, with shadowed ones marked (imports nothing)."""
        with self._lock:
            out = []
            for scheme in self.schemes():
                chosen = self._chosen(scheme)
                claims = list(self._discover().get(scheme, []))
                if scheme in self._in_process:
                    claims.insert(0, self._in_process[scheme])
                for entry in claims:
                    if entry is not chosen:
                        entry.status = "shadowed"
                        entry.shadowed_by = chosen.distribution if chosen else None
                    out.append(entry)
            return out

    # -- choices -------------------------------------------------------------------------

    def register(self, scheme: str, driver_class: type[Driver]) -> None:
        """Register a driver class for a scheme in this process; it wins over entry points."""
        _check_driver_class(driver_class, f"in-process driver for scheme {scheme!r}")
        entry = DriverEntry(
            scheme=scheme.lower(),
            distribution=IN_PROCESS,
            version="",
            target=f"{driver_class.__module__}:{driver_class.__qualname__}",
            status="ok",
            driver_class=driver_class,
        )
        with self._lock:
            self._in_process[entry.scheme] = entry

    def unregister(self, scheme: str) -> None:
        """Undo :meth:`register`."""
        with self._lock:
            self._in_process.pop(scheme.lower(), None)

    def prefer(self, scheme: str, distribution: str) -> None:
        """Choose which installed distribution serves ``scheme`` when several claim it."""
        with self._lock:
            self._preferences[scheme.lower()] = distribution

    # -- resolution ----------------------------------------------------------------------

    def get_driver_class(self, scheme: str) -> type[Driver]:
        """The driver class for ``scheme``, importing its module on first use.

        Raises ``CommError(NOT_SUPPORTED)`` naming the scheme, the known schemes and what to
        install, or the distribution and error of a driver that failed to load.
        """
        scheme = scheme.lower()
        with self._lock:
            entry = self._chosen(scheme)
            if entry is None:
                known = ", ".join(self.schemes()) or "none"
                hint = OFFICIAL_PACKAGES.get(scheme)
                install = f"; install {hint}" if hint else ""
                raise CommError(
                    CommError.NOT_SUPPORTED, f"no driver for scheme {scheme!r} (known schemes: {known}){install}"
                )
            if entry.driver_class is None and entry.status != "failed":
                self._load(entry)
            if entry.driver_class is None:
                raise CommError(
                    CommError.NOT_SUPPORTED,
                    f"driver for scheme {scheme!r} from {entry.distribution} {entry.version} failed to load: "
                    f"{entry.error}",
                )
            return entry.driver_class

    def create_driver(self, scheme: str) -> Driver:
        """A new driver instance for ``scheme``."""
        return self.get_driver_class(scheme)()

    def load_all(self) -> list[DriverEntry]:
        """Load every chosen driver (for ``sfm drivers`` and the demo); failures are recorded."""
        entries = self.entries()
        for entry in entries:
            if entry.status == "not loaded":
                with self._lock:
                    self._load(entry)
        return entries

    def _load(self, entry: DriverEntry) -> None:
        try:
            obj = entry._entry_point.load()  # type: ignore[attr-defined]
            _check_driver_class(obj, f"entry point {entry.scheme} = {entry.target!r} of {entry.distribution}")
        except Exception as e:  # any failure in a third-party import is that driver's problem only
            entry.status = "failed"
            entry.error = f"{type(e).__name__}: {e}" if not isinstance(e, CommError) else e.message
            log.error("driver for scheme %r from %s failed to load: %s", entry.scheme, entry.distribution, entry.error)
            return
        entry.driver_class = obj
        entry.status = "ok"
        register_module_of(obj)
        broadcast("sfm_driver_loaded", scheme=entry.scheme, driver_class=obj)


def _check_driver_class(obj: object, what: str) -> None:
    if not (isinstance(obj, type) and issubclass(obj, Driver)):
        raise CommError(CommError.BAD_CONFIG, f"{what} is not a subclass of sfm_core.Driver (got {obj!r})")


_default: DriverRegistry | None = None


def get_registry() -> DriverRegistry:
    """The process-wide registry used by ``ConnManager.add_connector`` and the CLI."""
    global _default
    if _default is None:
        _default = DriverRegistry()
    return _default
