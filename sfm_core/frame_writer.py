"""The order and the writing of one connection's frames.

One thread at a time holds a connection's *write role* and writes. A frame that finds no one
writing is written at once by the thread that sends it: a lone message and request/response
take no queue and no hand-off. A small frame that finds a write in progress is queued and its
sender returns; whoever holds the role hands the queue to the connection's background writer
thread, which sends it together (on the TCP driver: one buffer, one ``send``). A sender thus
writes only its own frame, never other threads' (a shared reactor thread is never held by
them), and the background writer, not a caller, waits on a peer that reads slowly. Threads
that wait for the role (a large frame, a handshake) are served first come, first served.

One sender thread alone benefits too: once it has sent ``STREAM_RUN`` frames in a row, each
starting within ``STREAM_GAP`` of the one before and nothing received in between, its next
small frames go to the background writer, so its writes overlap its own work. A thread that
delivers the connection's frames (a receiver replying) always writes its own.

DATA frames are numbered as they are written, so the sequence numbers follow the wire. What
queues is bounded (``QUEUE_FRAMES``; a sender then waits for room), waited for by ``drain``,
and dropped by ``close``, like a driver's own queue. Control frames (PING, PONG) that find
the role held go out first after the frame being written. A write of queued frames that fails
closes the connection (their senders had returned; the peer could not tell where the gap
is): the error is logged, and every later send says why.

Drivers without ``send_frames`` (the event-loop drivers, which queue and coalesce in
:class:`sfm_core.send_queue.SendQueue` themselves) keep the plain path: every frame is
written by its sender, in turn.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .errors import CommError
from .frames import PREFIX, Payload
from .session import State

if TYPE_CHECKING:
    from .driver import Connection
    from .session import Session

log = logging.getLogger(__name__)

#: A frame whose payload is at most this many bytes may be queued behind a write in
#: progress; a larger one waits for the role and is written by its own thread (coalescing
#: gains nothing there, and it keeps a big write's timeout with its sender).
SMALL_PAYLOAD = 4096
#: Queued frames past which a sender waits for room (the background writer is behind):
#: at most 8 MiB, about 270 KiB of 100-byte messages.
QUEUE_FRAMES = 2048
#: The bound for the thread that reads the connection: at most 64 MiB, as the TCP driver's
#: read-ahead while a reply waits (``_READ_WHILE_SENDING``).
READER_QUEUE_FRAMES = 16384
#: A frame sent within this many seconds of the start of the one before continues a run.
STREAM_GAP = 50e-6
#: After this many frames in a run, one sender's small frames go to the background writer.
STREAM_RUN = 4
#: An idle background writer thread ends after this many seconds.
IDLE_EXIT = 1.0
_OPEN = State.OPEN
# Poll period of waits that must also notice a close.
_WAIT = 0.5


def _small(payload: Payload | None) -> bool:
    t = type(payload)
    if t is bytes or t is bytearray:
        return len(payload) <= SMALL_PAYLOAD  # type: ignore[arg-type]
    if t is memoryview:
        return payload.nbytes <= SMALL_PAYLOAD  # type: ignore[union-attr]
    return payload is None


class FrameWriter:
    """Orders and writes the frames of one driver connection (see the module docstring)."""

    # One per connection, and a listener may hold thousands: slots, and the condition made
    # only when first waited on (10,000 fan-in connections took 25 MB more without).
    __slots__ = (
        "_background",
        "_closed",
        "_cond",
        "_failed",
        "_in_flight",
        "_last_start",
        "_lock",
        "_queue",
        "_role",
        "_run",
        "_send_frames",
        "_stream_run",
        "_thread",
        "_urgent",
        "_waiters",
        "batched_frames",
        "batches",
        "conn",
        "name",
        "reader",
        "session",
    )

    def __init__(self, conn: Connection, session: Session, name: str, *, stream_handoff: bool = True) -> None:
        self.conn = conn
        self.session = session
        #: Back-to-back sends of one thread go to the background writer (else each writes its own).
        self._stream_run = STREAM_RUN if stream_handoff else 1 << 62
        self.name = name
        #: The driver's call for several whole frames at once; None: no coalescing.
        self._send_frames: Any = getattr(conn, "send_frames", None)
        self._lock = threading.Lock()  # guards everything below, and the choice of writer
        self._cond: threading.Condition | None = None  # on _lock; see _changed
        self._role = threading.Lock()  # held by whoever writes; may be released by another thread
        #: Checked, not yet numbered DATA frames: ``(app_id, stream_id, check_data(...))``.
        #: (Made when a frame first queues, under _lock: a connection that never queues
        #: has none; until then it is an empty tuple, which reads as an empty queue.)
        self._queue: deque[tuple[int, int, tuple[int, bytes, list]]] | tuple[()] = ()
        self._urgent: list[bytes] = []
        self._background = False  # the background writer holds the role
        self._in_flight = 0  # frames the background writer is writing
        self._thread: threading.Thread | None = None
        #: Threads waiting for the role, first come first served (it is handed to them).
        self._waiters: list[threading.Event] = []
        self._closed = False
        self._failed: str | None = None
        self._run = 0
        #: The thread delivering this connection's frames right now, if the driver delivers
        #: inline (set by the core around the delivery). When it sends here, finding no one
        #: writing, it writes itself (the TCP driver reads while it waits for room, so two
        #: peers replying to each other on full buffers do not wait for each other); it waits
        #: for room only past ``READER_QUEUE_FRAMES``.
        self.reader: int | None = None
        self._last_start = 0.0  # when the last directly written frame began
        #: Writes of queued frames, and the frames they carried (diagnostics, tests).
        self.batches = 0
        self.batched_frames = 0

    # -- sending -------------------------------------------------------------------------

    def send_data(
        self, session: Session, app_id: int, stream_id: int, headers: dict | None, payload: Payload | None
    ) -> None:
        """Encode one DATA frame and write it, or queue it behind the write in progress."""
        # The hot path of every message: written out, with no helper calls.
        if self._send_frames is None:
            # A driver that queues itself (ws, grpc): the role as a lock, written out here (the
            # per-message path of those drivers; each helper call showed in their rates).
            # Taken with a plain blocking acquire, as the send lock before the frame writer
            # was: a timed acquire cost 4 senders up to 30 % (measured, with or without a try
            # first). So a waiting sender notices a close only when the holder lets go, which
            # it does when its write returns or raises; closing the SfmConnection closes the
            # driver's connection, whose send_frame then raises (its contract, driver.py).
            self._role.acquire()
            if self._urgent or self._failed is not None or self._closed:
                self._plain_taken()
            try:
                self.conn.send_frame(session.data_frame(app_id, stream_id, headers, payload))
            except CommError:
                raise
            except Exception as e:
                raise CommError(CommError.ERROR, f"send on {self.name} failed: {type(e).__name__}: {e}") from e
            finally:
                self._let_go()
            return
        t = type(payload)
        if t is bytes or t is bytearray:
            small = len(payload) <= SMALL_PAYLOAD  # type: ignore[arg-type]
        else:
            small = _small(payload)
        if not small:
            self._send_in_turn(session, app_id, stream_id, headers, payload)
            return
        role = self._role
        if role.acquire(False):
            # No one writes: write it now (no lock taken: this is the path of a lone
            # message and of request/response).
            try:
                if self._failed is not None or self._closed:
                    self._check_open()
                if self._waiters:
                    with self._lock:
                        self._release_locked()  # to the first in line; we line up too
                    in_turn = True
                else:
                    in_turn = False
                    now = time.monotonic()
                    self._run = run = self._run + 1 if now - self._last_start < STREAM_GAP else 0
                    self._last_start = now
                    direct = (run < self._stream_run or threading.get_ident() == self.reader) and not (
                        self._queue or self._urgent
                    )
                    if not direct:
                        if t is not bytes and payload is not None:
                            payload = bytes(payload)  # the caller may reuse its buffer once we return
                        checked = session.check_data(headers, payload)
            except BaseException:
                with self._lock:
                    self._release_locked()
                raise
            if in_turn:
                self._send_in_turn(session, app_id, stream_id, headers, payload)
                return
            if direct:
                try:
                    self.conn.send_frame(session.data_frame(app_id, stream_id, headers, payload))
                except CommError:
                    raise
                except Exception as e:
                    raise CommError(CommError.ERROR, f"send on {self.name} failed: {type(e).__name__}: {e}") from e
                finally:
                    self._let_go()  # what queued or came to wait while we wrote: handed on
                return
            # The sends come back to back: from now on the background writer sends them,
            # while this thread goes on. (Or frames queued as the last writer let go still
            # wait for its hand-over: they go first.)
            with self._lock:
                self._queue_made().append((app_id, stream_id, checked))
                self._hand_to_background()
            return
        # Someone writes. No lock here (this is every queued frame's path): the append is
        # atomic, and whoever lets go of the role looks at the queue after letting go, while
        # we try for the role after appending, so one of us sees the frame.
        if self._failed is not None or self._closed:
            self._check_open()
        if self._waiters or session.state is not _OPEN:
            # A big frame or a handshake waits for the role, or holds it (READY is being
            # written: a message sent the moment the peer is known follows it).
            self._send_in_turn(session, app_id, stream_id, headers, payload)
            return
        if t is not bytes and payload is not None:
            payload = bytes(payload)  # the caller may reuse its buffer once we return
        queue = self._queue
        if type(queue) is tuple:
            with self._lock:
                queue = self._queue_made()
        queue.append((app_id, stream_id, session.check_data(headers, payload)))
        if role.acquire(False):
            with self._lock:
                self._release_locked()  # the writer let go before it could see this frame
        elif len(queue) > QUEUE_FRAMES:
            with self._lock:
                self._wait_for_room()
        if session.state is not _OPEN:
            # Closing began as we queued: a drain may have looked already. See it written
            # (or, if the connection closes first, say so).
            self._acquire()
            with self._lock:
                self._release_locked()
        return

    def _send_in_turn(
        self, session: Session, app_id: int, stream_id: int, headers: dict | None, payload: Payload | None
    ) -> None:
        # Wait for the role after what is queued and those already waiting, then write.
        self._acquire()
        try:
            self.write(session.data_frame(app_id, stream_id, headers, payload))
        finally:
            self._let_go()

    def frames_arrived(self) -> None:
        """Frames arrived: the traffic is not a one-way stream, so the next small frame that
        finds no one writing is written at once (a reply is not handed off)."""
        self._run = 0

    def send_frames_locked(self, bufs: list, count: int) -> None:
        """Write ``count`` whole frames given as their buffers back to back (one driver call
        where the driver has ``send_frames``); the caller holds the role (:meth:`exclusive`)."""
        try:
            if self._send_frames is not None:
                self._send_frames(bufs, count)
            else:
                _send_each(self.conn, bufs)
        except CommError:
            raise
        except Exception as e:
            raise CommError(CommError.ERROR, f"send on {self.name} failed: {type(e).__name__}: {e}") from e

    def send_control(self, frame: bytes) -> None:
        """Write a PING or PONG now if no one is writing, else first after the frame being
        written; never waits for the role."""
        with self._lock:
            if self._closed:
                return
            if self._urgent or not self._role.acquire(False):
                # Someone writes, or control frames wait already: this one goes after them.
                self._urgent.append(frame)
                if self._role.acquire(False):
                    self._release_locked()  # the writer let go before it could see it
                return
        try:
            self.write(frame)
        except CommError as e:
            log.info("control frame on %s not sent: %s", self.name, e)
        finally:
            with self._lock:
                self._release_locked()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the write role: frames written with :meth:`write` in the block go out with no
        frame between them; small frames sent meanwhile queue and follow."""
        self._acquire()
        try:
            yield
        finally:
            self._let_go()

    def write(self, frame: Payload) -> None:
        """Write one encoded frame; the caller holds the role."""
        try:
            self.conn.send_frame(frame if type(frame) is list else [frame])
        except CommError:
            raise
        except Exception as e:
            raise CommError(CommError.ERROR, f"send on {self.name} failed: {type(e).__name__}: {e}") from e

    # -- closing -------------------------------------------------------------------------

    def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` s until what was sent before is written; return how many
        frames were still queued (1 for a write in progress) if that did not happen."""
        try:
            taken = self._acquire(max(0.0, timeout))
        except CommError:
            return 0  # closed: nothing more will be written
        with self._lock:
            if not taken:
                return len(self._queue) + len(self._urgent) + self._in_flight or 1
            self._release_locked()
        return 0

    def close(self) -> None:
        """Drop what is queued and end the background writer (the transport is closing)."""
        with self._lock:
            self._closed = True
            self._notify()

    @property
    def queued(self) -> int:
        """Frames waiting for the background writer."""
        return len(self._queue) + len(self._urgent)

    # -- the role ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._failed is not None:
            raise CommError(CommError.CLOSED, self._failed)
        if self._closed:
            raise CommError(CommError.CLOSED, f"connection {self.name} is closed")

    def _acquire(self, timeout: float | None = None) -> bool:
        """Take the role, after what is queued and those already waiting for it; False if
        ``timeout`` ran out."""
        got = not self._waiters and self._role.acquire(False)
        if got:
            if self._failed is not None or self._closed:
                self._let_go()
                self._check_open()
            if not (self._queue or self._urgent):
                return True
        elif self._send_frames is None:
            return self._acquire_plain(timeout)
        turn = threading.Event()
        with self._lock:
            if got:  # frames queued as the last writer let go: they go first, then the role to us
                self._waiters.insert(0, turn)
                self._release_locked()
            else:
                self._check_open()
                self._waiters.append(turn)
                if self._waiters[0] is turn and self._role.acquire(False):
                    if not (self._queue or self._urgent):
                        self._waiters.pop(0)  # let go meanwhile, by a writer that did not see us
                        return True
                    self._release_locked()  # the queue first; then the role comes to us
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not turn.wait(_WAIT if deadline is None else max(0.0, min(_WAIT, deadline - time.monotonic()))):
                with self._lock:
                    if turn.is_set():
                        break
                    if (
                        self._failed is not None
                        or self._closed
                        or (deadline is not None and time.monotonic() >= deadline)
                    ):
                        self._waiters.remove(turn)
                        if deadline is not None and not (self._failed or self._closed):
                            return False
                        self._check_open()
        except BaseException:
            with self._lock:
                if turn.is_set():
                    self._release_locked()  # handed to us as we gave up: pass it on
                elif turn in self._waiters:
                    self._waiters.remove(turn)
            raise
        if self._failed is not None or self._closed:
            self._let_go()  # handed to us as the connection failed or closed
            self._check_open()
        return True

    def _acquire_plain(self, timeout: float | None) -> bool:
        """The role on a driver without ``send_frames``: nothing queues here, so it is taken as
        a lock is (handing it over in turn would make every sender wait for a thread switch:
        four senders on ws ran at a sixth of the rate). Control frames that came meanwhile go
        first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = _WAIT if deadline is None else min(_WAIT, deadline - time.monotonic())
            if wait <= 0:
                return False
            if self._role.acquire(timeout=wait):
                break
            if self._failed is not None or self._closed:
                self._check_open()
        self._plain_taken()
        return True

    def _plain_taken(self) -> None:
        # The plain role was just taken: refuse if closed or failed, and write the control
        # frames that came meanwhile first. Anything raised gives the role back.
        try:
            if self._failed is not None or self._closed:
                self._check_open()
            while self._urgent:
                frame = self._urgent.pop(0)
                try:
                    self.conn.send_frame([frame])
                except Exception as e:  # the connection is failing; its close follows
                    log.info("control frame on %s not sent: %s", self.name, e)
        except BaseException:
            self._let_go()
            raise

    def _let_go(self) -> None:
        # Give up the role without the lock, then look: a frame queued, or a thread come to
        # wait, meanwhile is seen here, or its sender takes the role that was let go.
        self._role.release()
        if self._queue or self._urgent or self._waiters:
            self._pick_up()

    def _release_locked(self) -> None:
        # The one way the role is given up (but for a direct writer's, which then checks
        # again): what queued while it was held goes to the background writer first, then the
        # role passes to the first waiting thread; all under the lock that queuing and
        # waiting take, so nothing is left with no writer.
        if (self._queue or self._urgent) and not self._closed:
            self._hand_to_background()
            return
        if self._queue or self._urgent:
            self._drop_queue()
        if self._waiters:
            self._waiters.pop(0).set()  # the role passes on, still held
            return
        self._role.release()
        # A frame queued (without the lock) as we let go: its sender may have tried for the
        # role just before; if no one took it since, it is ours to hand on.
        if self._queue and self._role.acquire(False):
            self._release_locked()

    @property
    def _changed(self) -> threading.Condition:
        # Made on first use, under _lock (every wait and notify is).
        cond = self._cond
        if cond is None:
            cond = self._cond = threading.Condition(self._lock)
        return cond

    def _notify(self) -> None:
        if self._cond is not None:  # no condition yet: no one ever waited on it
            self._cond.notify_all()

    def _pick_up(self) -> None:
        # Frames queued while the role was held and let go without the lock: whoever gets the
        # role now hands them on (a sender that lost this race does it itself).
        if self._role.acquire(False):
            with self._lock:
                self._release_locked()

    def _wait_for_room(self) -> None:
        # The thread that reads this connection goes on (up to a far larger bound): were it to
        # wait, two peers replying to each other on full buffers would wait for each other.
        limit = READER_QUEUE_FRAMES if threading.get_ident() == self.reader else QUEUE_FRAMES
        while len(self._queue) > limit:
            self._check_open()
            self._changed.wait(_WAIT)

    def _hand_to_background(self) -> None:
        # The role stays held: it passes to the background writer.
        if self._thread is None:
            thread = threading.Thread(target=self._background_loop, name=f"sfm-writer-{self.name}", daemon=True)
            try:
                thread.start()
            except RuntimeError as e:  # no thread to be had: what queued can go nowhere
                self._failed = f"connection {self.name}: no thread for its background writer: {e}"
                log.warning("%s; %d frame(s) lost, closing the connection", self._failed, len(self._queue))
                self._drop_queue()
                self._release_locked()
                return
            self._thread = thread
        self._background = True
        self._notify()

    def _queue_made(self) -> deque:
        # Under _lock: the one deque senders append to from now on.
        queue = self._queue
        if type(queue) is tuple:
            queue = self._queue = deque()
        return queue  # type: ignore[return-value]

    def _drop_queue(self) -> None:
        if self._queue:
            log.info("connection %s closed: %d queued frame(s) dropped", self.name, len(self._queue))
            self._queue.clear()  # type: ignore[union-attr]
        self._urgent = []
        self._notify()

    def _background_loop(self) -> None:
        lock = self._lock
        with lock:
            while True:
                while not self._background:
                    if self._closed or (not self._changed.wait(IDLE_EXIT) and not self._background):
                        self._thread = None
                        return
                if self._closed or self._failed is not None:
                    self._drop_queue()
                    self._background = False
                    self._release_locked()
                    continue
                urgent, self._urgent = self._urgent, []
                queue = self._queue  # (an empty tuple if only control frames ever queued)
                # Taken one by one from the one deque that senders append to without the lock.
                items = [queue.popleft() for _ in range(len(queue))]
                self._in_flight = len(items)
                lock.release()
                try:
                    self._write_batch(urgent, items)
                except BaseException as e:  # (a thread that is not the main one gets no interrupts)
                    self._fail(e, len(items))  # outside the lock: a driver's close may call back
                lock.acquire()
                self._in_flight = 0
                # Room only now, not while the batch was written: a sender woken meanwhile
                # would hold the interpreter while this thread needs it back after each write.
                self._notify()
                if not self._queue and not self._urgent:
                    self._background = False
                    self._last_start = time.monotonic()  # a sender that goes on streaming hands on at once
                    self._release_locked()

    def _write_batch(self, urgent: list[bytes], items: list) -> None:
        send = self.conn.send_frame
        for frame in urgent:
            send([frame])
        if not items:
            return
        self.batches += 1
        self.batched_frames += len(items)
        # Numbered here, as they go out: the numbers follow the order on the wire.
        bufs = self.session.number_data(items)
        if self._send_frames is not None:
            # The frames are small: one copy into one buffer is cheaper than an iovec entry
            # (and a memoryview, if the kernel takes part) per buffer.
            self._send_frames([b"".join(bufs)], len(items))
        else:
            _send_each(self.conn, bufs)

    def _fail(self, e: BaseException, count: int) -> None:
        why = e.message if isinstance(e, CommError) else f"{type(e).__name__}: {e}"
        self._failed = f"connection {self.name}: writing queued frames failed: {why}"
        log.warning("%s; %d frame(s) lost, closing the connection", self._failed, count)
        try:
            self.conn.close()
        except Exception:
            log.exception("closing %s failed", self.name)


def _send_each(conn: Connection, bufs: Sequence) -> None:
    """Write frames given back to back one ``send_frame`` each (a driver without
    ``send_frames``): split at their heads again."""
    i, n = 0, len(bufs)
    send_frame = conn.send_frame
    while i < n:
        length = PREFIX.unpack_from(bufs[i])[0]
        j, size = i + 1, len(bufs[i])
        while size < length:
            size += memoryview(bufs[j]).nbytes
            j += 1
        send_frame(list(bufs[i:j]))
        i = j
