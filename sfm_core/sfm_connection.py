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

#: A writable payload buffer up to this size that has to wait behind another thread's write
#: is copied; a larger one waits for that write to finish and is written by its own thread.
_COPY_LIMIT = 2048
#: Bytes queued behind a write in flight before more senders wait (backpressure).
_QUEUE_LIMIT = 256 * 1024
#: A queue up to this size is joined into one buffer for one send.
_JOIN_LIMIT = 512 * 1024


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
        # A driver that writes on the caller's thread and can write several whole frames in
        # one call (``send_frames(bufs, count)``, sfm_driver_tcp) gets the writer role below:
        # frames queue behind a write in flight and go out together.
        self._send_frames = getattr(conn, "send_frames", None)
        self._cond = threading.Condition(self._send_lock)
        self._writing = False  # a thread is the writer (it writes outside the lock)
        self._pending: list = []  # buffers of whole frames queued behind its write
        self._pending_frames = 0
        self._pending_bytes = 0
        self._in_flight = 0  # frames of the batch the writer is sending (drain's count)
        self._waiters = 0  # threads waiting on _cond

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
        """Send one DATA frame as ``[head, *payload]``: the payload is never copied (a small
        writable one is, when it must wait behind another thread's write; see :meth:`_queue_locked`)."""
        if self._send_frames is None:
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
            return
        with self._send_lock:
            frame = self.session.data_frame(app_id, stream_id, headers, payload)
            if self._writing or self._pending:  # (a queue without a writer: it is taking it back)
                frame = self._queue_locked(frame, 1)  # None: the writer sends it
            else:
                self._writing = True
            if self._urgent:
                self._flush_urgent_locked()  # into the queue: after our frame
        if frame is not None:
            self._write(frame, 1)
        if self._urgent:
            self._flush_urgent()

    def send_batch(
        self, app_id: int, stream_ids: Sequence[int], messages: Sequence[tuple[dict | None, Payload | None]]
    ) -> None:
        """Send several DATA frames in order under one lock: their heads are packed in one
        loop (everything is checked before anything is sent) and, on a driver that can
        (``send_frames``), they go out together, the payloads not copied.
        ``stream_ids``: one per message."""
        count = len(messages)
        if self._send_frames is None:
            with self._send_lock:
                bufs = self.session.data_frames(app_id, stream_ids, messages)
                try:
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
            return
        with self._send_lock:
            bufs = self.session.data_frames(app_id, stream_ids, messages)
            if self._writing or self._pending:
                bufs = self._queue_locked(bufs, count)
            else:
                self._writing = True
            if self._urgent:
                self._flush_urgent_locked()
        if bufs is not None:
            self._write(bufs, count)
        if self._urgent:
            self._flush_urgent()

    # -- the writer role (drivers with send_frames: one writer at a time, outside the lock) --
    #
    # A frame that finds no write in flight makes its thread the writer: it is written before
    # its send returns (a lone message never waits for company). A frame that finds a write
    # in flight is queued, and the writer, once its syscall returns, sends everything queued
    # meanwhile with one send_frames: frames that come faster than the socket takes them
    # share syscalls. The lock orders the sequence numbers and the queue; the write itself
    # happens outside it, so other senders queue while the writer is in the kernel.

    def _queue_locked(self, bufs: list, count: int) -> list | None:
        """Queue frames behind the write in flight (the lock is held). None: queued, the
        writer sends them. Otherwise the caller is now the writer and writes what is returned
        (its frames, or ``[]`` if they were queued and the writer had just finished).

        Small writable buffers are copied (the caller may reuse them once we return); a large
        writable one waits for the writer to finish and is then written by its own thread, so
        it is never copied. Waits while ``_QUEUE_LIMIT`` bytes are queued (backpressure: the
        writer is bounded by the driver's ``send_timeout``)."""
        big_writable = False
        for b in bufs:
            if type(b) is not bytes and len(b) > _COPY_LIMIT:
                big_writable = True
                break
        if big_writable or self._pending_bytes >= _QUEUE_LIMIT:
            self._waiters += 1
            try:
                while (self._writing or self._pending) and (big_writable or self._pending_bytes >= _QUEUE_LIMIT):
                    if self.closing or self.lost:
                        raise CommError(CommError.CLOSED, f"connection {self.conn.name} closed while sending")
                    self._cond.wait(1.0)
            finally:
                self._waiters -= 1
            if not self._writing and not self._pending:
                self._writing = True
                return bufs
        pending = self._pending
        size = 0
        for b in bufs:
            if type(b) is not bytes:
                b = bytes(b)
            pending.append(b)
            size += len(b)
        self._pending_frames += count
        self._pending_bytes += size
        if not self._writing:
            # The writer let go after we saw it (it clears the flag without the lock, then
            # looks at the queue again): whoever takes the lock first with a queue takes over.
            self._writing = True
            return []
        return None

    def _write(self, bufs: list, count: int) -> None:
        """The writer: send our own frames (``CommError`` if that fails), then what queued
        behind them, until nothing is left; then the writer role ends."""
        conn = self.conn
        if bufs:
            try:
                if count == 1:
                    conn.send_frame(bufs)
                else:
                    self._send_frames(bufs, count)  # type: ignore[misc]
            except BaseException as e:
                self._end_writing(e)
                if isinstance(e, CommError) or not isinstance(e, Exception):
                    raise
                raise CommError(CommError.ERROR, f"send on {conn.name} failed: {type(e).__name__}: {e}") from e
        while True:
            # Let go without the lock, then look again: a sender that saw the flag set
            # appended (under the lock) before we cleared it, so the queue shows it.
            self._writing = False
            if not self._pending:
                if self._waiters:
                    with self._send_lock:
                        self._cond.notify_all()
                return
            with self._send_lock:
                if self._writing or not self._pending:
                    return  # another sender took over, or a control frame went out meanwhile
                self._writing = True
                bufs, count, size = self._pending, self._pending_frames, self._pending_bytes
                self._pending, self._pending_frames, self._pending_bytes = [], 0, 0
                self._in_flight = count
                if self._waiters:
                    self._cond.notify_all()
            if size <= _JOIN_LIMIT and len(bufs) > 1:
                bufs = [b"".join(bufs)]  # copies or small bytes: one buffer, one send
            try:
                self._send_frames(bufs, count)  # type: ignore[misc]
            except Exception as e:
                # Their senders have returned: the connection closes, as when the kernel
                # loses what it had accepted.
                log.info("%s: closing: %d queued frame(s) not sent: %s", conn.name, count, e)
                conn.close()
                self._end_writing(e)
                return
            self._in_flight = 0

    def _end_writing(self, error: BaseException) -> None:
        with self._send_lock:
            if self._pending:
                log.info("%s: closing: %d queued frame(s) dropped: %s", self.conn.name, self._pending_frames, error)
                self.conn.close()  # the frames queued behind a failed write cannot follow it
            self._pending, self._pending_frames, self._pending_bytes = [], 0, 0
            self._writing = False
            self._in_flight = 0
            self._cond.notify_all()

    def _send_each(self, bufs: list) -> None:
        # A driver that takes one frame per call: split the batch at its heads again.
        i, n = 0, len(bufs)
        send_frame = self.conn.send_frame
        while i < n:
            head = bufs[i]
            length = PREFIX.unpack_from(head)[0]
            j, size = i + 1, len(head)
            while size < length:
                size += len(bufs[j])
                j += 1
            send_frame(bufs[i:j])
            i = j

    def send(self, frame: Payload) -> None:
        """Send one encoded frame in turn with the data frames."""
        with self._send_lock:
            self._wait_idle_locked(None)
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
        # The send lock is held: write the queued control frames after the frame just sent,
        # or, while another thread is the writer, put them first in its queue (the next frame
        # boundary; they are bytes, never copied).
        if self._writing:
            while self._urgent:
                frame = self._urgent.popleft()
                self._pending.insert(0, frame)
                self._pending_frames += 1
                self._pending_bytes += len(frame)
            return
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
        try:
            if not self._wait_idle_locked(deadline):
                return self._pending_frames + max(1, self._in_flight)  # the writer is stuck
        finally:
            self._send_lock.release()
        try:
            return self.conn.drain(max(0.0, deadline - time.monotonic()))
        except Exception:
            log.exception("drain failed on %s", self.conn.name)
            return 0

    def _wait_idle_locked(self, deadline: float | None) -> bool:
        """Wait (the lock held, through the condition) until no thread is the writer, up to
        ``deadline`` (monotonic; None: as long as it takes, each write being bounded by the
        driver); True once idle."""
        if not self._writing and not self._pending:
            return True
        self._waiters += 1
        try:
            while self._writing or self._pending:
                wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if wait <= 0:
                    return False
                self._cond.wait(wait)
        finally:
            self._waiters -= 1
        return True

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
        task = self.conn_manager.process_frame_task
        conn.rx_busy = True
        try:
            for frame in frames:
                if conn.closing:
                    break
                task(conn, frame)
        finally:
            conn.rx_busy = False
