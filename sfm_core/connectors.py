"""Running a connector: listen once, or connect and reconnect with backoff and jitter."""

from __future__ import annotations

import logging
import random
import threading

from .driver import ConnectorInfo, Mode

log = logging.getLogger(__name__)

_handle_lock = threading.Lock()
_handle_count = 0


def get_handle() -> str:
    """A new connector handle, unique in this process (``CH00001``, ...)."""
    global _handle_count
    with _handle_lock:
        _handle_count += 1
        return f"CH{_handle_count:05d}"


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
