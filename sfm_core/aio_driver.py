"""A base for drivers on the shared asyncio loop (``sfm_core.aio``), and ``wait_closed()``.

The core calls ``listen``/``connect`` on connector threads and ``shutdown`` from yet
another thread; a driver built on an asyncio library runs its sockets on the one loop
thread. :class:`AioDriver` holds what every such driver needs in between:

* the shared loop, acquired and released around each ``listen``/``connect``
  (:meth:`AioDriver.acquire`, :meth:`AioDriver.release`; :attr:`AioDriver.loop_thread`
  while any holds it);
* the stopping flag: :attr:`AioDriver.stopping`, and :meth:`AioDriver.wait_stopping` for a
  ``listen`` that blocks until ``shutdown()``;
* running a coroutine on the loop from the connector thread with a timeout
  (:meth:`AioDriver.run`): refused once stopping, ``CommError(CLOSED)`` if shutdown cancels
  it, ``CommError(TIMEOUT)`` (and the coroutine cancelled) when it takes too long;
* ``shutdown()``: sets the flag (waking ``wait_stopping``), closes every connection the core
  knows (``Driver.shutdown``), then, on the loop, :meth:`AioDriver.shutdown_on_loop`, which
  closes the connections in :attr:`AioDriver._live` (those still in their handshake, that
  the core does not know yet) and is the place to cancel what the driver has in progress.

:class:`AioConnection` adds ``wait_closed(timeout)`` to a connection: the driver calls
``set_closed()`` once its transport is gone. Example::

    class MyDriver(AioDriver):
        DRIVER_NAME = "my driver"
        def listen(self, connector):
            lt = self.acquire()
            try:
                server = self.run(start_server(lt.loop, ...), 30)
                connector.listening(url)
                self.wait_stopping()
            finally:
                lt.run(server.aclose(), 30)
                self.release()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Coroutine
from typing import Any, ClassVar, TypeVar

from .aio import LoopThread, acquire_loop, release_loop
from .driver import Connection as _Connection
from .driver import ConnectorInfo, Driver
from .errors import CommError

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["AioConnection", "AioDriver"]


class AioConnection(_Connection):
    """A :class:`~sfm_core.driver.Connection` that can be waited on until it is closed.

    The driver calls :meth:`set_closed` once the transport is gone (every resource of the
    connection released); anyone may then wait for it with :meth:`wait_closed`, from any
    thread. Typical use: a ``connect`` that blocks for the life of its connection.
    """

    def __init__(self, connector: ConnectorInfo | None) -> None:
        super().__init__(connector)
        self._closed_event = threading.Event()

    @property
    def closed(self) -> bool:
        """True once the transport is gone (:meth:`set_closed` ran)."""
        return self._closed_event.is_set()

    def set_closed(self) -> None:
        """Say the transport is gone: wakes every :meth:`wait_closed`. Idempotent."""
        self._closed_event.set()

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until the transport is gone or ``timeout`` s passed; True if it is gone.

        Never call it on the loop thread (the loop is what closes the transport)."""
        return self._closed_event.wait(timeout)


class AioDriver(Driver):
    """A driver whose connections run on the shared asyncio loop (see the module).

    Subclasses set :attr:`DRIVER_NAME` (it names the driver in errors: ``"websocket driver
    is shut down"``), call ``super().__init__()``, and ``super().shutdown()`` if they override
    :meth:`shutdown`. ``self._lock`` is free for the subclass's own bookkeeping too.
    """

    #: Names the driver in errors and logs.
    DRIVER_NAME: ClassVar[str] = "asyncio driver"

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._loop_thread: LoopThread | None = None
        self._loop_users = 0
        #: Connections on the loop not (or not yet) known to the core, e.g. in their
        #: handshake; loop thread only. :meth:`shutdown_on_loop` closes them.
        self._live: set[Any] = set()

    # -- the loop ----------------------------------------------------------------------------

    @property
    def loop_thread(self) -> LoopThread | None:
        """The shared loop while a ``listen``/``connect`` of this driver holds it, else None."""
        return self._loop_thread

    def acquire(self) -> LoopThread:
        """The shared loop, started if needed; pair each call with :meth:`release` (finally)."""
        lt = acquire_loop()
        with self._lock:
            self._loop_users += 1
            self._loop_thread = lt
        return lt

    def release(self) -> None:
        """Give back one :meth:`acquire`; the last user of the process stops the loop."""
        with self._lock:
            self._loop_users -= 1
            if not self._loop_users:
                self._loop_thread = None
        release_loop()

    # -- stopping ----------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """True once :meth:`shutdown` was called (a driver instance is not restarted)."""
        return self._stop_event.is_set()

    def wait_stopping(self, timeout: float | None = None) -> bool:
        """Block until :meth:`shutdown` (or ``timeout`` s); True once stopping. For ``listen``."""
        return self._stop_event.wait(timeout)

    def check_running(self) -> None:
        """Raise ``CommError(CLOSED)`` once stopping: for the start of ``connect``."""
        if self._stop_event.is_set():
            raise CommError(CommError.CLOSED, f"{self.DRIVER_NAME} is shut down")

    # -- running on the loop -----------------------------------------------------------------

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop (held by :meth:`acquire`), unless stopping: then it is
        closed unrun and ``CommError(CLOSED)`` raised. Atomic with :meth:`shutdown`: a
        coroutine submitted here sees :attr:`stopping` set or is running when it is set."""
        with self._lock:
            lt = self._loop_thread
            if self._stop_event.is_set() or lt is None:
                coro.close()
                if lt is None and not self._stop_event.is_set():
                    raise RuntimeError(f"{type(self).__name__}.submit without acquire()")
                raise CommError(CommError.CLOSED, f"{self.DRIVER_NAME} is shut down")
            return lt.submit(coro)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float, *, timeout_message: str | None = None) -> T:
        """Run ``coro`` on the loop from a connector thread and return its result.

        Its own exceptions come through as they are. Raises ``CommError(CLOSED)`` when the
        driver is stopping (the coroutine is then not run) or the coroutine was cancelled
        (by :meth:`shutdown_on_loop`, or the loop stopping), and ``CommError(TIMEOUT)`` with
        ``timeout_message`` (default: no result within ``timeout`` s) after cancelling it
        when it takes longer than ``timeout`` s. Never call it on the loop thread.
        """
        fut = self.submit(coro)
        try:
            return fut.result(timeout)
        except (concurrent.futures.CancelledError, asyncio.CancelledError):
            raise CommError(CommError.CLOSED, f"{self.DRIVER_NAME} is shut down") from None
        except concurrent.futures.TimeoutError:
            if not fut.done():
                fut.cancel()
                raise CommError(
                    CommError.TIMEOUT, timeout_message or f"{self.DRIVER_NAME}: no result within {timeout} s"
                ) from None
            raise  # the coroutine's own TimeoutError

    # -- shutdown ----------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Set :attr:`stopping` (waking :meth:`wait_stopping`), close the connections the core
        knows, and run :meth:`shutdown_on_loop` on the loop if a listen/connect holds it."""
        with self._lock:
            self._stop_event.set()
        super().shutdown()
        lt = self._loop_thread
        if lt is not None:
            try:
                lt.call_soon(self.shutdown_on_loop)
            except RuntimeError:  # the loop is closed: nothing left on it
                pass

    def shutdown_on_loop(self) -> None:
        """On the loop thread, once stopping: close every connection in :attr:`_live`.
        Override it to cancel work in progress too (and call ``super()``)."""
        for conn in list(self._live):
            try:
                conn.close()
            except Exception:  # one bad connection must not keep the others open
                log.exception("%s: error closing %s", self.DRIVER_NAME, conn)
