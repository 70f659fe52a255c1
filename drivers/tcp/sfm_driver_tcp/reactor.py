"""A small epoll reactor run by a pool of threads (leader/followers).

Every socket is registered with ``EPOLLONESHOT``: an event hands the socket to exactly one
pool thread, which reads it, delivers what it read, and only then re-arms it. So:

* one connection is never served by two threads at once, and its frames stay in order;
* delivery needs no hand-off to another thread (the round trip pays no thread wake-up);
* a slow receiver holds only its own connection: while it is busy, that socket is not read,
  its kernel buffer fills, and TCP flow control slows the sender. The other pool threads
  keep serving every other connection.

Writes never go through the reactor: senders write on their own thread (see connection.py).
docs/architecture.md has the measurements behind this design.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from typing import Protocol

log = logging.getLogger(__name__)

_ARMED = select.EPOLLIN | select.EPOLLONESHOT
# Rounds a pool thread serves one busy socket before re-arming it: re-arming a socket with
# data waiting wakes another pool thread, so while data keeps coming the thread that has the
# socket (and its warm caches) keeps it, within this bound for fairness.
_KEEP_ROUNDS = 64
#: Seconds a pool thread waits on a one-way stream (data was waiting at the last check, and
#: the last round sent nothing back) that has just run dry, before handing it back to epoll.
#: Without it a fast receiver reads one or two small frames per wake-up and each of the
#: sender's sends pays for waking it (measured: 1.5 frames per read, 126k msgs/s; with 50 us,
#: 160k msgs/s). A lone message is served in one round and never waits; nor does a round
#: that replied, since in request/response the next request comes only after the reply, and
#: a sleep cannot be cut short when it arrives.
DEFAULT_GATHER = 50e-6


class Readable(Protocol):
    def fileno(self) -> int: ...

    def on_readable(self) -> None: ...

    def readable_now(self) -> bool: ...

    def wants_gather(self) -> bool: ...

    def on_reactor_stop(self) -> None: ...


class Reactor:
    """Runs ``on_readable`` of registered handlers on the threads of :meth:`serve`."""

    def __init__(self, name: str = "sfm-tcp", *, oneshot: bool = True, gather: float = DEFAULT_GATHER) -> None:
        self.name = name
        self._gather = gather
        # One thread needs no hand-over protection: level-triggered saves a re-arm per event.
        self._mask = _ARMED if oneshot else select.EPOLLIN
        self._oneshot = oneshot
        self._epoll = select.epoll()
        self._handlers: dict[int, Readable] = {}
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Level-triggered and not one-shot: once written, it wakes every pool thread to exit.
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._stopping = False
        self._closed = False
        self._lock = threading.Lock()

    def add(self, handler: Readable) -> None:
        """Watch ``handler`` for readability (any thread)."""
        fd = handler.fileno()
        with self._lock:
            self._handlers[fd] = handler
        self._epoll.register(fd, self._mask)

    def rearm(self, handler: Readable) -> None:
        """Watch ``handler`` again after its event was served (or after a close request)."""
        fd = handler.fileno()
        if fd < 0 or self._handlers.get(fd) is not handler:
            return
        try:
            self._epoll.modify(fd, _ARMED)
        except (OSError, ValueError):  # closed meanwhile
            pass

    def remove(self, handler: Readable, fd: int) -> None:
        """Forget a handler whose socket is about to close (its serving thread)."""
        with self._lock:
            if self._handlers.get(fd) is handler:
                del self._handlers[fd]
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass

    def stop(self) -> None:
        """Make :meth:`serve` return soon (any thread)."""
        with self._lock:
            self._stopping = True
            if not self._closed:  # never write to a descriptor number that may be reused
                os.eventfd_write(self._wake_fd, 1)

    def serve(self, threads: int = 1, stop_when_empty: bool = False) -> None:
        """Serve events on this thread and ``threads - 1`` more until :meth:`stop`.

        With ``stop_when_empty`` it also returns once no handler is left (one connection).
        On return every handler still registered gets ``on_reactor_stop`` and the
        descriptors of the reactor are closed.
        """
        if threads > 1 and not self._oneshot:
            raise ValueError("a reactor served by several threads must be one-shot")
        self._serve(threads, stop_when_empty)

    def _serve(self, threads: int, stop_when_empty: bool) -> None:
        helpers = [
            threading.Thread(target=self._loop, args=(False,), name=f"{self.name}-{i}", daemon=True)
            for i in range(1, threads)
        ]
        for t in helpers:
            t.start()
        try:
            self._loop(stop_when_empty)
        finally:
            self.stop()
            for t in helpers:
                t.join()
            with self._lock:
                left = list(self._handlers.values())
                self._handlers.clear()
            for handler in left:
                try:
                    handler.on_reactor_stop()
                except Exception:
                    log.exception("error stopping %r", handler)
            self.close()

    def close(self) -> None:
        """Release the reactor's descriptors without serving (a driver's error path)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            self._epoll.close()
            os.close(self._wake_fd)

    def _loop(self, stop_when_empty: bool) -> None:
        poll = self._epoll.poll
        handlers = self._handlers
        wake_fd = self._wake_fd
        rearm = self.rearm if self._oneshot else None
        while not self._stopping:
            if stop_when_empty and not handlers:
                return
            for fd, _events in poll(1.0, 1):
                if fd == wake_fd:
                    return
                handler = handlers.get(fd)
                if handler is None:
                    continue
                try:
                    handler.on_readable()
                    if rearm is not None:
                        rounds = 1
                        while rounds < _KEEP_ROUNDS and self._more(handler, rounds):
                            handler.on_readable()
                            rounds += 1
                except Exception:  # a handler bug must not kill a pool thread
                    log.exception("error serving %r", handler)
                if rearm is not None:
                    rearm(handler)

    def _more(self, handler: Readable, rounds: int) -> bool:
        """Keep serving ``handler``? Yes while it has data; a one-way stream gets one short wait."""
        if handler.readable_now():
            return True
        if rounds == 1 or not self._gather or not handler.wants_gather():
            return False
        time.sleep(self._gather)  # the socket is disarmed: arriving data wakes nobody meanwhile
        return handler.readable_now()
