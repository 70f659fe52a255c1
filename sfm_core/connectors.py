"""Running a connector: listen once, or connect and reconnect with backoff and jitter."""

from __future__ import annotations

import logging
import random
import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .driver import ConnectorInfo, Driver, Mode
from .driver_params import ParamError
from .driver_params import check_params as param_check
from .errors import CommError
from .tls import SECURE_SCHEMES
from .url import parse_url

if TYPE_CHECKING:
    from .registry import DriverRegistry

log = logging.getLogger(__name__)

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*$")
_handle_lock = threading.Lock()
_handle_count = 0


def get_handle() -> str:
    """A new connector handle, unique in this process (``CH00001``, ...)."""
    global _handle_count
    with _handle_lock:
        _handle_count += 1
        return f"CH{_handle_count:05d}"


def resolve_driver(driver: Driver | str, params: dict | None, registry: DriverRegistry) -> tuple[Driver, dict]:
    """The driver and params for ``add_connector``: ``driver`` is a Driver, a URL
    (``tcp://0:8002``, its query becoming params) or a scheme. Raises ``CommError``."""
    params = dict(params or {})
    if isinstance(driver, str):
        if "://" in driver or not _SCHEME.match(driver):
            params = {**parse_url(driver), **params}
            scheme = params["scheme"]
        else:
            scheme = driver.lower()
            params.setdefault("scheme", scheme)
        driver = registry.create_driver(scheme)
    elif not isinstance(driver, Driver):
        raise CommError(CommError.BAD_CONFIG, f"add_connector needs a Driver, URL or scheme, got {driver!r}")
    if "scheme" not in params:
        params["scheme"] = driver.supported_transports()[0]
    return driver, params


def _param_errors(driver: Driver, params: dict, mode: Mode) -> tuple[dict, list[str]]:
    """The params against the driver's declared ones and the core's, and ``secure`` only
    where the driver has TLS: the typed values and every error."""
    scheme = params.get("scheme")
    name = f"{type(driver).__name__} ({scheme}://)" if scheme else type(driver).__name__
    values, errors = param_check(driver.parameters(), params, mode, driver=name)
    if values["secure"] and not driver.capabilities().get("tls"):
        errors.insert(
            0,
            f"secure=true on {scheme}://, but its driver {type(driver).__module__}.{type(driver).__name__} has no TLS",
        )
    return values, errors


def connector_errors(driver: Driver, params: dict, mode: Mode) -> list[str]:
    """Every mistake in a connector's params, in words (empty: none), for ``sfm config check``:
    what :func:`check_params` would refuse, all of it at once. The driver's own
    :meth:`Driver.validate` (TLS files, checks across parameters) runs only once every
    parameter is right, and adds its error."""
    _, errors = _param_errors(driver, params, mode)
    if errors:
        return errors
    try:
        driver.validate(params, mode)
    except CommError as e:
        return list(getattr(e, "errors", None) or [e.message or str(e)])
    return []


def check_params(driver: Driver, params: dict, mode: Mode) -> None:
    """What ``add_connector`` checks before a connector exists: every parameter (unknown
    keys, types, ranges, modes; see :mod:`sfm_core.driver_params`), raised as one
    :class:`~sfm_core.driver_params.ParamError` (``CommError(BAD_CONFIG)``) whose ``errors``
    lists them all; then the driver's own :meth:`Driver.validate`."""
    values, errors = _param_errors(driver, params, mode)
    if errors:
        raise ParamError(errors)
    scheme = params.get("scheme")
    tls_given = sorted(
        k for k in ("ca_cert", "server_cert", "server_key", "client_cert", "client_key") if params.get(k)
    )
    if tls_given and scheme not in SECURE_SCHEMES and not values["secure"]:
        log.warning(
            "%s:// connector given %s: ignored, the connection is plain (use the secure scheme or secure=true)",
            scheme,
            ", ".join(tls_given),
        )
    driver.validate(params, mode)


def run_connector(
    connector: ConnectorInfo, stop_event: threading.Event, reconnect_min: float, reconnect_max: float
) -> None:
    """Run ``connector`` until it is stopped (its driver's ``listen`` or ``connect`` loop)."""
    if connector.mode == Mode.PASSIVE:
        try:
            connector.driver.listen(connector)
        except Exception as e:
            connector.failed(e)
            if not connector.stopping:
                log.error("listener %s failed: %s", connector, e)
        return
    attempt = 0
    while not connector.stopping and not stop_event.is_set():
        before = connector.total_conns
        try:
            connector.driver.connect(connector)
        except Exception as e:
            connector.error = e
            if not connector.stopping:
                log.info("connector %s: %s", connector, e)
        if connector.stopping:
            break
        attempt = 0 if connector.total_conns > before else attempt + 1
        delay = min(reconnect_max, reconnect_min * (2 ** min(attempt, 20)))
        delay *= random.uniform(0.5, 1.0)  # jitter keeps a crowd of clients from reconnecting in step
        if stop_event.wait(delay):
            break


def stop_connector(connector: ConnectorInfo, thread: threading.Thread | None) -> None:
    """Shut a connector's driver down and join its thread."""
    connector.stopping = True
    try:
        connector.driver.shutdown()
    except Exception:
        log.exception("driver shutdown failed for %s", connector)
    if thread is not None and thread is not threading.current_thread():
        thread.join(10.0)
        if thread.is_alive():
            log.warning("connector thread %s did not stop", thread.name)


class ConnectorSet:
    """The connectors of one ConnManager and the threads that run them."""

    def __init__(self, reconnect_min: float, reconnect_max: float) -> None:
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.by_handle: dict[str, ConnectorInfo] = {}
        self.stop_event = threading.Event()
        self._threads: dict[str, threading.Thread] = {}

    def get(self, handle: str) -> ConnectorInfo:
        """The connector for a handle; ``CommError(BAD_CONFIG)`` if unknown."""
        connector = self.by_handle.get(handle)
        if connector is None:
            raise CommError(CommError.BAD_CONFIG, f"no connector with handle {handle!r}")
        return connector

    def start(self, connector: ConnectorInfo, task: Callable[..., None]) -> None:
        """Run ``task(connector, stop_event, reconnect_min, reconnect_max)`` on a new thread, once."""
        if connector.started:
            return
        connector.started = True
        t = threading.Thread(
            target=task,
            args=(connector, self.stop_event, self.reconnect_min, self.reconnect_max),
            name=f"sfm-{connector.mode.value}-{connector.handle}",
            daemon=True,
        )
        self._threads[connector.handle] = t
        t.start()

    def remove(self, handle: str) -> None:
        """Stop one connector and join its thread (unknown handles are ignored)."""
        connector = self.by_handle.pop(handle, None)
        thread = self._threads.pop(handle, None)
        if connector is not None:
            stop_connector(connector, thread)

    def reload_tls(self) -> None:
        """Every connector's driver reloads its TLS files; then ``CommError(BAD_CONFIG)``
        names each that failed (those keep their old files)."""
        errors = []
        for connector in list(self.by_handle.values()):
            try:
                connector.driver.reload_tls()
            except CommError as e:
                errors.append(f"connector {connector.handle} ({connector.params.get('url')}): {e.message}")
        if errors:
            raise CommError(CommError.BAD_CONFIG, "; ".join(errors))

    def stop_all(self) -> None:
        """Stop every connector and join their threads."""
        self.stop_event.set()
        for handle in list(self.by_handle):
            self.remove(handle)
