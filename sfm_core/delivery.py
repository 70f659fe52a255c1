"""Ordered delivery off the I/O threads, with bounded queues.

Each connection gets a :class:`Lane`. Items submitted to a lane run in submission order, on
one of a few shared worker threads (a lane never runs on two threads at once), so thousands
of connections cost no thread each. A lane holds at most ``max_items``/``max_bytes`` of
undelivered frames; past that the lane asks the driver to pause reading (or, for a driver that
cannot pause, blocks the submitting thread) until the receiver catches up, so a slow receiver
slows the sender instead of growing memory.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

log = logging.getLogger(__name__)

_STOP = object()


class Dispatcher:
    """A pool of delivery threads that run ready lanes."""

    def __init__(self, workers: int = 4, name: str = "sfm-deliver", batch: int = 256) -> None:
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._workers = workers
        self._name = name
        self._batch = batch
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self._workers):
            t = threading.Thread(target=self._work, name=f"{self._name}-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop once everything queued is handled, lanes' backlogs included; join the threads
        (not the calling one: a receiver or monitor may be the one that stops us)."""
        for _ in self._threads:
            self._ready.put(_STOP)
        me = threading.current_thread()
        for t in self._threads:
            if t is me:
                continue
            t.join(timeout)
            if t.is_alive():
                log.warning("delivery thread %s still busy after %s s", t.name, timeout)
        self._threads = []

    def lane_for(
        self,
        conn: Any,
        handler: Callable[[Any], None],
        max_items: int,
        max_bytes: int,
        batch_handler: Callable[[Iterator[Any]], None] | None = None,
    ) -> Lane:
        """A lane for a driver connection: paused through the driver if it can pause."""
        pausable = conn.supports_pause
        return self.lane(
            handler,
            max_items=max_items,
            max_bytes=max_bytes,
            pause=conn.pause_reading if pausable else None,
            resume=conn.resume_reading if pausable else None,
            batch_handler=batch_handler,
        )

    def run_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` once on a delivery thread (work that may block, off a timer thread)."""
        self._ready.put(_Call(fn))

    def lane(
        self,
        handler: Callable[[Any], None],
        *,
        max_items: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        pause: Callable[[], None] | None = None,
        resume: Callable[[], None] | None = None,
        batch_handler: Callable[[Iterator[Any]], None] | None = None,
    ) -> Lane:
        """A new ordered lane whose items are passed to ``handler`` one by one, or, given
        ``batch_handler``, to it as an iterator over a batch: one call for many items. It
        must take the items in order; if it raises, the error is logged and it is called
        again with the same iterator, so the failing item is skipped and the rest still run
        (as with ``handler``)."""
        return Lane(self, handler, max_items, max_bytes, pause, resume, batch_handler)

    def _work(self) -> None:
        ready = self._ready
        batch = self._batch
        while True:
            lane = ready.get()
            if lane is _STOP:
                # Lanes with more than a batch left re-queue themselves behind the stop: run
                # what is still queued (they keep re-queuing until empty), then exit.
                while True:
                    try:
                        lane = ready.get_nowait()
                    except queue.Empty:
                        return
                    if lane is _STOP:
                        ready.put(_STOP)  # another worker's: leave it for that worker
                        return
                    lane._run(batch)
            lane._run(batch)


class _Call:
    """A one-off function on the ready queue (``Dispatcher.run_soon``)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def _run(self, batch: int) -> None:
        try:
            self.fn()
        except Exception:
            log.exception("delivery task failed")


class Lane:
    """An ordered queue of items for one connection; see the module docstring."""

    __slots__ = (
        "_batch_handler",
        "_bytes",
        "_closed",
        "_dispatcher",
        "_handler",
        "_items",
        "_lock",
        "_max_bytes",
        "_max_items",
        "_pause",
        "_paused",
        "_resume",
        "_room",
        "_scheduled",
        "_then",
    )

    def __init__(
        self,
        dispatcher: Dispatcher,
        handler: Callable[[Any], None],
        max_items: int,
        max_bytes: int,
        pause: Callable[[], None] | None,
        resume: Callable[[], None] | None,
        batch_handler: Callable[[Iterator[Any]], None] | None = None,
    ) -> None:
        self._dispatcher = dispatcher
        self._handler = handler
        self._batch_handler = batch_handler
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._pause = pause
        self._resume = resume
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._items: list = []
        self._bytes = 0
        self._scheduled = False
        self._paused = False
        self._closed = False
        self._then: Callable[[], None] | None = None

    def submit(self, items: Sequence[Any], nbytes: int = 0) -> bool:
        """Queue items (from an I/O thread); False if the lane is closed. Applies backpressure."""
        with self._lock:
            if self._closed:
                return False
            self._items.extend(items)
            self._bytes += nbytes
            full = len(self._items) >= self._max_items or self._bytes >= self._max_bytes
            if not self._scheduled:
                self._scheduled = True
                self._dispatcher._ready.put(self)
            if not full:
                return True
            if self._pause is not None:
                if not self._paused:
                    self._paused = True
                    self._pause()
                return True
            # The driver cannot pause: hold its reading thread until there is room.
            while not self._closed and (len(self._items) >= self._max_items or self._bytes >= self._max_bytes):
                self._room.wait(1.0)
            return True

    def close(self) -> Callable[[], None] | None:
        """Drop what is queued and release a blocked submitter. Returns the callback a
        :meth:`finish` had left pending (the caller runs it: it is owed)."""
        with self._lock:
            self._closed = True
            self._items = []
            self._bytes = 0
            then, self._then = self._then, None
            self._room.notify_all()
        return then

    def finish(self, then: Callable[[], None]) -> bool:
        """Call ``then()`` on a delivery thread once every item submitted so far is handled;
        nothing more is accepted. False (and ``then`` never called) if the lane is closed."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True  # submit refuses from now on; _run still drains what is here
            self._then = then
            self._room.notify_all()
            if not self._scheduled:
                self._scheduled = True
                self._dispatcher._ready.put(self)
            return True

    @property
    def busy(self) -> bool:
        """True while items wait or are being handled."""
        return self._scheduled

    @property
    def queued(self) -> int:
        """Items waiting in the lane (not counting a batch a delivery thread has taken)."""
        return len(self._items)

    @property
    def paused(self) -> bool:
        """True while the lane has asked its driver to stop reading (it was full)."""
        return self._paused

    def _run(self, batch: int) -> None:
        with self._lock:
            items = self._items[:batch]
            del self._items[:batch]
        batch_handler = self._batch_handler
        if batch_handler is not None:
            done_bytes = sum(map(len, items))
            rest = iter(items)
            while True:
                try:
                    batch_handler(rest)  # returns once it has taken every item
                    break
                except Exception:  # as below; the item that raised is skipped, the rest go on
                    log.exception("delivery handler failed")
        else:
            handler = self._handler
            done_bytes = 0
            for item in items:
                try:
                    handler(item)
                except Exception:  # the handler reports its own errors; this is a last resort
                    log.exception("delivery handler failed")
                done_bytes += len(item)
        then = None
        with self._lock:
            self._bytes = max(0, self._bytes - done_bytes)
            low = len(self._items) < self._max_items // 2 and self._bytes < self._max_bytes // 2
            if self._paused and low:
                self._paused = False
                # Under the lock, so a pause decided by a concurrent submit cannot be
                # overtaken by this resume (the driver calls only schedule work).
                if self._resume is not None:
                    self._resume()
            elif not self._paused and low:
                self._room.notify_all()
            if self._items and (not self._closed or self._then is not None):
                self._dispatcher._ready.put(self)
            else:
                self._scheduled = False
                then, self._then = self._then, None
        if then is not None:
            try:
                then()
            except Exception:
                log.exception("lane finish callback failed")
