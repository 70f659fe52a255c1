"""The heartbeat timer: one thread per ConnManager runs every connection's session timers."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .errors import CommError
from .session import Expired, PingDue
from .sfm_connection import SfmConnection

log = logging.getLogger(__name__)


class Heartbeat:
    """Every ``period`` s: tick each connection's session, send the PINGs it asks for and
    close the connections it declares expired (no handshake in time, a dead peer)."""

    def __init__(
        self,
        local_name: str,
        connections: Callable[[], list[SfmConnection]],
        period: float,
        abandon: Callable[[SfmConnection], None],
        run_soon: Callable[[Callable[[], None]], None],
    ) -> None:
        self.local_name = local_name
        self.connections = connections
        #: Close a connection and forget it at once (its peer is gone: no graceful close).
        self.abandon = abandon
        #: Run a send that may block (a PING on a driver without send_urgent) off this thread.
        self.run_soon = run_soon
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sfm-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and join it."""
        self._stop.set()
        if self._thread.ident is not None and self._thread is not threading.current_thread():
            self._thread.join(10.0)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            now = time.monotonic()
            for sfm_conn in self.connections():
                try:
                    self.tick(sfm_conn, now)
                except Exception:
                    log.exception("heartbeat check failed on %s", sfm_conn.name)

    def tick(self, sfm_conn: SfmConnection, now: float) -> None:
        """Run one connection's timers at ``now`` and act on what its session says."""
        session = sfm_conn.session
        if sfm_conn.receiving():
            session.heard(now)  # its frames wait for our receiver: we are the slow one
        event = session.tick(now)
        if type(event) is PingDue:
            if sfm_conn.conn.send_urgent(event.frame):
                return
            # Written by send_frame, which may block on a peer that stopped reading: on a
            # delivery thread, so this one goes on timing every other connection.
            frame = event.frame
            self.run_soon(lambda: self._ping(sfm_conn, frame))
        elif type(event) is Expired:
            peer = sfm_conn.sfm_endpoint.endpoint.name if sfm_conn.sfm_endpoint else "an unnamed peer"
            log.warning("%s: closing %s to %s: %s", self.local_name, sfm_conn.name, peer, event.reason)
            self.abandon(sfm_conn)

    def _ping(self, sfm_conn: SfmConnection, frame: bytes) -> None:
        try:
            sfm_conn.send_control(frame)
        except CommError as e:
            log.info("%s: PING on %s failed: %s", self.local_name, sfm_conn.name, e)
