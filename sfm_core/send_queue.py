"""A bounded send queue for drivers whose writer is not the sending thread (an event loop).

The core calls ``Connection.send_frame`` from its own threads; a driver on an event loop
queues the frame there and lets the loop write it. :class:`SendQueue` is that queue, with
the rules every such driver needs:

* **Backpressure by bytes.** :meth:`SendQueue.put` blocks while ``high_water`` bytes are
  queued and not yet released by the writer; one item always goes into an empty queue,
  however big. After ``timeout`` seconds without room it raises ``CommError(TIMEOUT)``
  naming the connection; on the loop thread itself (which is the writer, so it can never
  make room) it raises at once instead of deadlocking.
* **Close.** :meth:`SendQueue.close` refuses new items and wakes every blocked sender with
  ``CommError(CLOSED)``; what is queued stays for the writer to finish (a graceful close).
  :meth:`SendQueue.drop` also forgets what is queued and counts it in :attr:`SendQueue.dropped`.
* **Urgent items** (:meth:`SendQueue.put_urgent`: PING/PONG) never block and are not counted
  against ``high_water``; :meth:`SendQueue.take` hands them out before the data.
* **One wake-up per batch.** ``put`` and ``put_urgent`` return True only when the writer is
  idle and must be woken (``loop.call_soon_threadsafe``): a burst of sends costs one wake-up.
  The writer is idle after a :meth:`SendQueue.take` that found nothing, or one called with
  ``idle=True`` (a writer that takes everything and does not come back on its own).
* **Batches.** :meth:`SendQueue.take` returns every queued item, or as many as fit in
  ``max_bytes`` (by ``measure``, at least one), for a transport that joins small frames.
* **drain().** :meth:`SendQueue.pending` counts items queued or being written, and
  :meth:`SendQueue.drain` waits for that to reach 0: ``Connection.drain`` in one line.

Thread-safe: any number of senders and one writer. Example (the writer on the loop)::

    if self.sendq.put(frame, len(frame)):          # send_frame, any thread
        loop.call_soon_threadsafe(self._flush)
    batch = self.sendq.take(release=True, idle=True)  # _flush, on the loop
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from .errors import CommError

T = TypeVar("T")

__all__ = ["Batch", "SendQueue"]


class Batch(Generic[T]):
    """What one :meth:`SendQueue.take` hands the writer: ``urgent`` items first, then the
    data ``items`` in order, ``nbytes`` (their sizes as given to ``put``) and ``waiters``
    (True if a sender was blocked for room: the peer is slow but alive, tell the frame
    receiver ``bytes_sent()`` once they are written). False when empty."""

    __slots__ = ("items", "nbytes", "urgent", "waiters")

    def __init__(self, urgent: Any, items: Any, nbytes: int, waiters: bool) -> None:
        self.urgent = urgent
        self.items = items
        self.nbytes = nbytes
        self.waiters = waiters

    def __bool__(self) -> bool:
        return bool(self.urgent or self.items)

    def __repr__(self) -> str:
        return f"Batch(urgent={len(self.urgent)}, items={len(self.items)}, nbytes={self.nbytes})"


_EMPTY: tuple = ()


class SendQueue(Generic[T]):
    """A thread-safe FIFO of items to send, bounded by ``high_water`` bytes (see the module).

    ``describe()`` names the connection in errors (``"connection CN00001 to 10.0.0.1:5"``);
    a string works too. ``timeout`` is the default of :meth:`put`. ``loop``, if given, is
    the event loop whose thread writes: a ``put`` there that would have to wait raises
    ``CommError(TIMEOUT)`` at once, and :meth:`drain` there does not wait. ``idle`` says
    whether the writer starts idle (the first ``put`` returns True); pass False for a
    writer task that takes by itself when it starts.
    """

    def __init__(
        self,
        high_water: int,
        *,
        timeout: float = 60.0,
        describe: Callable[[], str] | str = "connection",
        loop: asyncio.AbstractEventLoop | None = None,
        idle: bool = True,
    ) -> None:
        self.high_water = high_water
        self.timeout = timeout
        self._describe = describe
        self._loop = loop
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._empty = threading.Condition(self._lock)
        self._items: deque = deque()
        self._sizes: deque = deque()
        self._urgent: list = []
        self._bytes = 0
        self._waiters = 0
        self._in_flight = 0  # batches taken with release=False and not yet done()
        self._flight_bytes = 0  # their bytes
        self._wake_pending = not idle
        self._closed = False
        #: Items accepted and never written: what :meth:`drop` discarded (plus its ``extra``).
        self.dropped = 0

    # -- state -----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` (or :meth:`drop`) ran: ``put`` raises ``CommError(CLOSED)``."""
        return self._closed

    @property
    def queued_bytes(self) -> int:
        """Bytes counted against ``high_water``: queued, and taken but not yet released."""
        return self._bytes

    @property
    def lock(self) -> threading.Lock:
        """The queue's lock: hold it to look at :attr:`items` and :attr:`queued_bytes` together."""
        return self._lock

    @property
    def items(self) -> deque:
        """The queued data items, oldest first (a live view for inspection; do not modify)."""
        return self._items

    def __len__(self) -> int:
        return len(self._items)

    def pending(self) -> int:
        """Items not yet written: queued data and urgent items, plus one per batch being written."""
        with self._lock:
            return len(self._items) + len(self._urgent) + self._in_flight

    def _name(self) -> str:
        d = self._describe
        return d if isinstance(d, str) else d()

    def _on_loop(self) -> bool:
        if self._loop is None:
            return False
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    # -- senders (any thread) --------------------------------------------------------------

    def put(self, item: T, size: int, timeout: float | None = None) -> bool:
        """Queue ``item`` of ``size`` bytes, blocking while the queue is over ``high_water``.

        Returns True when the writer is idle and must be woken. Raises ``CommError(CLOSED)``
        once closed (also while blocked), ``CommError(TIMEOUT)`` after ``timeout`` s (default
        :attr:`timeout`) without room, or at once on the writer's loop thread.
        """
        with self._lock:
            if self._closed:
                raise CommError(CommError.CLOSED, f"{self._name()} is closed")
            if self._bytes and self._bytes + size > self.high_water:
                self._wait_for_room(size, self.timeout if timeout is None else timeout)
            self._items.append(item)
            self._sizes.append(size)
            self._bytes += size
            if self._wake_pending:
                return False
            self._wake_pending = True
            return True

    def _wait_for_room(self, size: int, timeout: float) -> None:
        # With the lock held.
        if self._on_loop():
            raise CommError(
                CommError.TIMEOUT,
                f"{self._name()}: send queue full ({self._bytes} bytes) and the sender is the event loop thread, "
                "which cannot wait for it to drain",
            )
        deadline = time.monotonic() + timeout
        self._waiters += 1
        try:
            while self._bytes and self._bytes + size > self.high_water and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CommError(
                        CommError.TIMEOUT,
                        f"{self._name()}: {self._bytes} bytes not taken by the peer within {timeout} s",
                    )
                self._room.wait(left)
        finally:
            self._waiters -= 1
        if self._closed:
            raise CommError(CommError.CLOSED, f"{self._name()} closed while sending")

    def put_urgent(self, item: T) -> bool:
        """Queue a control item ahead of the data; never blocks, not counted in ``high_water``.

        Returns True when the writer must be woken; raises ``CommError(CLOSED)`` once closed.
        """
        with self._lock:
            if self._closed:
                raise CommError(CommError.CLOSED, f"{self._name()} is closed")
            self._urgent.append(item)
            if self._wake_pending:
                return False
            self._wake_pending = True
            return True

    def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` s until nothing is pending; return :meth:`pending` (0: all
        written), or :attr:`dropped` once closed. On the writer's loop thread it does not wait."""
        with self._lock:
            if not self._closed and not self._on_loop():
                deadline = time.monotonic() + timeout
                while not self._closed and (self._items or self._urgent or self._in_flight):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._empty.wait(left)
            if self._closed:
                return self.dropped
            return len(self._items) + len(self._urgent) + self._in_flight

    # -- the writer ------------------------------------------------------------------------

    def take(
        self,
        max_bytes: int | None = None,
        *,
        measure: Callable[[T], int] | None = None,
        data: bool = True,
        release: bool = False,
        idle: bool = False,
    ) -> Batch[T]:
        """Take what is to be written: every urgent item, then (with ``data``) the queued items.

        ``max_bytes`` None takes every item; otherwise the first item and then the next ones
        while their total ``measure(item)`` (default: their ``put`` size) stays within it
        (0: one item). ``release`` frees their bytes now (a writer whose transport has a
        buffer of its own); otherwise call :meth:`done` once the batch is written. An empty
        batch, or ``idle=True``, marks the writer idle: the next ``put`` returns True.
        """
        with self._lock:
            urgent = self._urgent
            if urgent:
                self._urgent = []
            else:
                urgent = _EMPTY
            items: Any = _EMPTY
            nbytes = 0
            if data and self._items:
                if max_bytes is None:
                    items = self._items
                    nbytes = self._bytes - self._flight_bytes
                    self._items = deque()
                    self._sizes.clear()
                else:
                    items, nbytes = self._take_some(max_bytes, measure)
            waiters = self._waiters > 0
            if not urgent and not items:
                self._wake_pending = False
                return Batch(urgent, items, 0, waiters)
            if idle:
                self._wake_pending = False
            if release:
                self._bytes -= nbytes
                if waiters:
                    self._room.notify_all()
                if not self._items and not self._urgent and not self._in_flight:
                    self._empty.notify_all()
            else:
                self._in_flight += 1
                self._flight_bytes += nbytes
            return Batch(urgent, items, nbytes, waiters)

    def _take_some(self, max_bytes: int, measure: Callable[[T], int] | None) -> tuple[list, int]:
        q, sizes = self._items, self._sizes
        first = q.popleft()
        nbytes = sizes.popleft()
        items = [first]
        if q and max_bytes > 0:
            total = nbytes if measure is None else measure(first)
            while q:
                n = sizes[0] if measure is None else measure(q[0])
                if total + n > max_bytes:
                    break
                total += n
                items.append(q.popleft())
                nbytes += sizes.popleft()
        return items, nbytes

    def done(self, batch: Batch[T]) -> bool:
        """The writer wrote ``batch`` (taken with ``release=False``): free its bytes and wake
        blocked senders. Returns True if a sender was blocked (tell the receiver ``bytes_sent()``)."""
        with self._lock:
            self._in_flight -= 1
            self._flight_bytes -= batch.nbytes
            self._bytes -= batch.nbytes
            waiters = self._waiters > 0
            if waiters:
                self._room.notify_all()
            if not self._items and not self._urgent and not self._in_flight:
                self._empty.notify_all()
        return waiters

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Refuse new items and wake blocked senders (``CommError(CLOSED)``) and :meth:`drain`;
        what is queued stays for the writer. Idempotent, any thread."""
        with self._lock:
            self._closed = True
            self._room.notify_all()
            self._empty.notify_all()

    def drop(self, extra: int = 0) -> tuple[int, int, int]:
        """:meth:`close`, and forget what is queued; return ``(items, bytes, urgent)`` dropped.

        The items (and ``extra``: frames the driver lost elsewhere, a transport buffer) are
        added to :attr:`dropped`. Log a warning when that is anything: the frames were
        accepted by ``send_frame`` and will never be sent.
        """
        with self._lock:
            self._closed = True
            frames = len(self._items)
            nbytes = sum(self._sizes)
            urgent = len(self._urgent)
            self._items.clear()
            self._sizes.clear()
            self._urgent = []
            self._bytes -= nbytes
            self.dropped += frames + extra
            self._room.notify_all()
            self._empty.notify_all()
        return frames, nbytes, urgent
