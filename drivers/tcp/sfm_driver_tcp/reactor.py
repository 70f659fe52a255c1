"""A minimal epoll reactor: one thread reads many non-blocking sockets.

Why not asyncio: the TCP driver needs only "tell me when this socket is readable". A bare
``select.epoll`` loop does that with the least work per wake-up (no Handle objects, no
callback queue), and writes never touch the loop at all: senders write on their own thread
(see :mod:`.connection`). docs/architecture.md has the measurements behind this choice.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from typing import Protocol

log = logging.getLogger(__name__)


class Readable(Protocol):
    def fileno(self) -> int: ...

    def on_readable(self) -> None: ...

    def on_reactor_stop(self) -> None: ...


class Reactor:
    """Runs ``on_readable`` of registered objects on the thread that calls :meth:`run`."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, Readable] = {}
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._stopping = False
        self._closed = False
        self._lock = threading.Lock()

    def add(self, handler: Readable) -> None:
        """Watch ``handler`` for readability (any thread)."""
        fd = handler.fileno()
        with self._lock:
            self._handlers[fd] = handler
        self._epoll.register(fd, select.EPOLLIN)

    def pause(self, handler: Readable) -> None:
        """Stop watching ``handler`` without forgetting it (any thread)."""
        try:
            self._epoll.unregister(handler.fileno())
        except (OSError, ValueError):  # already closed
            pass

    def resume(self, handler: Readable) -> None:
        """Watch a paused handler again (any thread)."""
        fd = handler.fileno()
        if fd < 0 or self._handlers.get(fd) is not handler:
            return
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except (OSError, ValueError):  # closed meanwhile, or already registered
            pass

    def remove(self, handler: Readable, fd: int) -> None:
        """Forget a handler whose socket is about to close (reactor thread)."""
        with self._lock:
            if self._handlers.get(fd) is handler:
                del self._handlers[fd]
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass

    def stop(self) -> None:
        """Make :meth:`run` return soon (any thread)."""
        with self._lock:
            self._stopping = True
            if not self._closed:  # never write to a descriptor number that may be reused
                os.eventfd_write(self._wake_fd, 1)

    @property
    def size(self) -> int:
        return len(self._handlers)

    def run(self, stop_when_empty: bool = False) -> None:
        """Dispatch readability until :meth:`stop` (or, optionally, until no handler is left).

        On return every handler still registered gets ``on_reactor_stop`` and the epoll and
        wake-up descriptors are closed.
        """
        poll = self._epoll.poll
        handlers = self._handlers
        wake_fd = self._wake_fd
        try:
            while not self._stopping:
                if stop_when_empty and not handlers:
                    break
                for fd, _events in poll(1.0):
                    if fd == wake_fd:
                        continue
                    handler = handlers.get(fd)
                    if handler is not None:
                        handler.on_readable()
        finally:
            with self._lock:
                left = list(handlers.values())
                handlers.clear()
            for handler in left:
                try:
                    handler.on_reactor_stop()
                except Exception:
                    log.exception("error stopping %r", handler)
            with self._lock:
                self._closed = True
                self._epoll.close()
                os.close(wake_fd)
