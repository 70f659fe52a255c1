"""One shared asyncio event loop thread for drivers built on asyncio libraries.

Drivers such as WebSocket and gRPC run all their connections as tasks of this one loop (no
loop or thread per connection). The loop starts on first :func:`acquire_loop` and its thread
is stopped and joined when the last user calls :func:`release_loop`, so nothing outlives the
drivers that used it. Set ``SFM_UVLOOP=1`` to run it on uvloop when that is installed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class LoopThread:
    """An asyncio loop running forever in a daemon thread, with thread-safe helpers."""

    def __init__(self, name: str = "sfm-aio") -> None:
        self.loop = _new_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = threading.Event()
        self._thread.start()
        self._started.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        try:
            self.loop.run_forever()
        finally:
            try:
                pending = asyncio.all_tasks(self.loop)
                for task in pending:
                    task.cancel()
                if pending:
                    self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                self.loop.run_until_complete(self.loop.shutdown_default_executor())
            finally:
                self.loop.close()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def in_loop(self) -> bool:
        """True when called on the loop's own thread."""
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule a coroutine from any thread; returns a concurrent future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Awaitable[T], timeout: float | None = None) -> T:
        """Run a coroutine on the loop and wait for its result (never call from the loop)."""
        if self.in_loop():
            raise RuntimeError("LoopThread.run called from its own loop; await instead")
        fut = asyncio.run_coroutine_threadsafe(_as_coro(coro), self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    def call_soon(self, fn: Any, *args: Any) -> None:
        """Call ``fn(*args)`` on the loop thread, from any thread."""
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop, cancel what is left, and join the thread."""
        if self.loop.is_closed():
            return
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:  # already closed
            pass
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("asyncio loop thread did not stop within %s s", timeout)


async def _as_coro(aw: Awaitable[T]) -> T:
    return await aw


def _new_loop() -> asyncio.AbstractEventLoop:
    if os.environ.get("SFM_UVLOOP") == "1":
        try:
            import uvloop

            return uvloop.new_event_loop()
        except ImportError:
            log.warning("SFM_UVLOOP=1 but uvloop is not installed; using the default asyncio loop")
    return asyncio.new_event_loop()


_lock = threading.Lock()
_shared: LoopThread | None = None
_users = 0


def acquire_loop() -> LoopThread:
    """Get the shared loop, starting it if needed. Pair every call with :func:`release_loop`."""
    global _shared, _users
    with _lock:
        if _shared is None:
            _shared = LoopThread()
        _users += 1
        return _shared


def release_loop() -> None:
    """Drop one use of the shared loop; the last one stops it and joins its thread."""
    global _shared, _users
    with _lock:
        if _users == 0:
            return
        _users -= 1
        if _users or _shared is None:
            return
        shared, _shared = _shared, None
    shared.stop()
