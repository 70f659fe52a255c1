"""One driver connection as the core sees it: its session, the lock that orders its sends,
its control frames, and the receiver that takes its frames from the driver."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .delivery import Lane
from .driver import Connection, ConnState, FrameReceiver, Mode
from .errors import CommError
from .frames import PREFIX, Payload
from .session import Session

if TYPE_CHECKING:
    from .conn_manager import ConnManager
    from .endpoint_table import SfmEndpoint

log = logging.getLogger(__name__)


class SfmConnection:
    """A driver :class:`Connection`, its :class:`Session`, and (for event-loop drivers) its lane.

    Data frames are encoded and sent under one lock, so they reach the wire in the order
    of their sequence numbers. Control frames (PING, PONG) never wait for that lock: the
    driver takes them ahead of its queue (:meth:`Connection.send_urgent`), or they wait
    in a small queue that the thread holding the lock sends right after its frame.
    """

    def __init__(self, conn: Connection, session: Session, mode: Mode, lane: Lane | None = None) -> None:
        self.conn = conn
        self.session = session
        self.mode = mode
        self.lane = lane
        self.sfm_endpoint: SfmEndpoint | None = None
        #: The driver reported it closed (set by the endpoint table, under its lock).
        self.lost = False
        #: The core decided to close it (bad data, a timeout, stop, ...).
        self.closing = False
        #: An inline driver's thread is delivering its frames right now (we are the slow one).
        self.rx_busy = False
        self._send_lock = threading.Lock()
        self._urgent: deque[bytes] = deque()
        #: The driver's call for several whole frames at once (``send_frames``), if it has one.
        self._send_frames = getattr(conn, "send_frames", None)

    @property
    def name(self) -> str:
        return self.conn.name

    def get_name(self) -> str:
        return self.conn.name

    def receiving(self) -> bool:
        """True while frames of this connection wait for, or are in, delivery."""
        lane = self.lane
        return self.rx_busy or (lane is not None and lane.busy)

    # -- sending -----------------------------------------------------------------------------

    def send_data(self, app_id: int, stream_id: int, headers: dict | None, payload: Payload | None) -> None:
        """Send one DATA frame as ``[head, *payload]``: the payload is never copied."""
        with self._send_lock:
            frame = self.session.data_frame(app_id, stream_id, headers, payload)
            try:
                self.conn.send_frame(frame)
            except CommError:
                raise
            except Exception as e:
                raise CommError(CommError.ERROR, f"send on {self.conn.name} failed: {type(e).__name__}: {e}") from e
            finally:
                if self._urgent:
                    self._flush_urgent_locked()
        if self._urgent:  # appended after the check above, while we still held the lock
            self._flush_urgent()

    def send_batch(
        self, app_id: int, stream_ids: Sequence[int], messages: Sequence[tuple[dict | None, Payload | None]]
    ) -> None:
        """Send several DATA frames in order under one hold of the send lock: their heads are
        packed in one loop (every frame is checked before anything is sent) and, on a driver
        that has ``send_frames``, they go out in one call, the payloads not copied.
        ``stream_ids``: one per message."""
        with self._send_lock:
            bufs = self.session.data_frames(app_id, stream_ids, messages)
            try:
                if self._send_frames is not None:
                    self._send_frames(bufs, len(messages))
                else:
                    self._send_each(bufs)
            except CommError:
                raise
            except Exception as e:
                raise CommError(CommError.ERROR, f"send on {self.conn.name} failed: {type(e).__name__}: {e}") from e
            finally:
                if self._urgent:
                    self._flush_urgent_locked()
        if self._urgent:
            self._flush_urgent()

    def _send_each(self, bufs: list) -> None:
        # A driver that takes one frame per call: split the batch at its heads again.
        i, n = 0, len(bufs)
        send_frame = self.conn.send_frame
        while i < n:
            length = PREFIX.unpack_from(bufs[i])[0]
            j, size = i + 1, len(bufs[i])
            while size < length:
                size += memoryview(bufs[j]).nbytes
                j += 1
            send_frame(bufs[i:j])
            i = j

    def send(self, frame: Payload) -> None:
        """Send one encoded frame in turn with the data frames."""
        with self._send_lock:
            self.write_locked(frame)
            if self._urgent:
                self._flush_urgent_locked()
        if self._urgent:
            self._flush_urgent()

    def write_locked(self, frame: Payload) -> None:
        """Send one encoded frame; the caller holds ``_send_lock``. (Drivers have always been
        handed a list of buffers.)"""
        try:
            self.conn.send_frame(frame if isinstance(frame, list) else [frame])
        except CommError:
            raise
        except Exception as e:
            raise CommError(CommError.ERROR, f"send on {self.conn.name} failed: {type(e).__name__}: {e}") from e

    def send_control(self, frame: bytes) -> None:
        """Send a PING or PONG at the next frame boundary, without waiting for a blocked sender."""
        if self.conn.send_urgent(frame):
            return
        self._urgent.append(frame)
        self._flush_urgent()

    def _flush_urgent_locked(self) -> None:
        # The send lock is held: write the queued control frames after the frame just sent.
        try:
            while self._urgent:
                self.conn.send_frame([self._urgent.popleft()])
        except Exception as e:  # the connection is failing; its close follows
            log.info("control frame on %s not sent: %s", self.conn.name, e)
            self._urgent.clear()

    def flush_control(self) -> None:
        """Send control frames that queued while the caller held ``_send_lock`` (call it after
        releasing the lock)."""
        if self._urgent:
            self._flush_urgent()

    def _flush_urgent(self) -> None:
        # If the lock is taken, its holder sends the queue: it checks after its frame and again
        # after letting go, and this checks after appending, so no frame is left behind.
        while self._urgent:
            if not self._send_lock.acquire(False):
                return
            try:
                self._flush_urgent_locked()
            finally:
                self._send_lock.release()

    # -- closing -----------------------------------------------------------------------------

    def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for the frames already accepted to reach the transport;
        return how many had not (new DATA is refused once :meth:`Session.begin_close` ran)."""
        deadline = time.monotonic() + timeout
        if not self._send_lock.acquire(timeout=max(0.0, timeout)):
            return 1 + self.conn.drain(0.0)  # a sender is stuck mid-frame
        self._send_lock.release()
        try:
            return self.conn.drain(max(0.0, deadline - time.monotonic()))
        except Exception:
            log.exception("drain failed on %s", self.conn.name)
            return 0

    def refuse(self, frame: bytes | None, wait: float = 1.0) -> None:
        """Send a refusal READY (if the peer may be told why), give it up to ``wait`` s to
        reach the transport, then close."""
        if frame is not None:
            try:
                self.send(frame)
                self.conn.drain(wait)
            except Exception as e:  # the peer may be gone already; it is being closed anyway
                log.debug("could not send the refusal on %s: %s", self.conn.name, e)
        self.close()

    def close(self) -> None:
        """Close the transport now (what is queued in the driver may be dropped)."""
        self.closing = True
        self.session.begin_close()
        self.conn.close()


def linger_on(sfm_conns: list[SfmConnection], linger: float, local_name: str) -> int:
    """Refuse new DATA on ``sfm_conns``, then wait up to ``linger`` s in all for what they
    accepted to reach the transport; log (WARNING) and return how many frames did not."""
    for sfm_conn in sfm_conns:
        sfm_conn.session.begin_close()
    deadline = time.monotonic() + linger
    dropped = 0
    for sfm_conn in sfm_conns:
        left = sfm_conn.drain(max(0.0, deadline - time.monotonic()))
        if left:
            dropped += left
            ep = sfm_conn.sfm_endpoint
            log.warning(
                "%s: %d frame(s) accepted for %s on %s still unsent after the %.1f s linger; closing drops them",
                local_name,
                left,
                ep.endpoint.name if ep else "an unnamed peer",
                sfm_conn.name,
                linger,
            )
    return dropped


class NullConnection(Connection):
    """The connection given to receivers of loopback messages (sent to ourselves)."""

    def __init__(self) -> None:
        super().__init__(None)
        self.state = ConnState.CONNECTED

    def get_conn_properties(self) -> dict:
        """Loopback has no transport properties."""
        return {}

    def close(self) -> None:
        """Nothing to close."""

    def send_frame(self, frame: Payload) -> None:
        """Loopback never sends frames."""
        raise CommError(CommError.NOT_SUPPORTED, "NullConnection does not send frames")


class SfmFrameReceiver(FrameReceiver):
    """Takes a connection's frames on the driver's I/O thread: delivers them right there
    (inline drivers) or queues them, in order, on the connection's lane."""

    def __init__(self, conn_manager: ConnManager, conn: SfmConnection) -> None:
        self.conn_manager = conn_manager
        self.conn = conn

    def process_frame(self, frame: Payload) -> None:
        """Take one frame."""
        self.process_frames((frame,))

    def bytes_received(self) -> None:
        """Part of a frame arrived: the peer is alive."""
        self.conn.session.heard(time.monotonic())

    def bytes_sent(self) -> None:
        """A waiting send moved on: the peer is reading."""
        self.conn.session.progressed(time.monotonic())

    def process_frames(self, frames: Sequence[Any]) -> None:
        """Take a batch of frames received together."""
        conn = self.conn
        conn.session.last_heard = time.monotonic()
        lane = conn.lane
        if lane is not None:
            lane.submit(frames, sum(map(len, frames)))
            return
        conn.rx_busy = True
        try:
            self.conn_manager.process_frames_task(conn, frames, inline=True)
        finally:
            conn.rx_busy = False
