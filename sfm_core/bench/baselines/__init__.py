"""The baselines of ``sfm bench``: bare libraries that only move bytes, one adapter each.

An adapter implements :class:`Baseline`: ``listen()`` in the receiving (child) process,
``connect()`` in the sending (parent) process, and a :class:`Link` on each side that sends
and receives whole messages. An asyncio library implements :class:`AsyncBaseline` instead
(the same methods as coroutines, :class:`AsyncLink`): the harness then runs its loops on an
event loop in each process, so the library is measured the way an asyncio driver uses it.
An adapter measures nothing: the harness (:mod:`sfm_core.bench.workloads`) owns the
workloads, the timing points, warm-up and statistics, and uses every adapter, and sfm
itself, the same way.

Built in: raw sockets (``tcp``), ``grpc.aio`` (``grpc``), ``websockets`` asyncio (``ws``,
``http``) and ``pyzmq`` (a reference row, when installed). A third-party distribution adds
one through the entry-point group ``sfm.bench_baselines`` (name: the scheme it is the
baseline of; value: an object or class implementing :class:`Baseline` or
:class:`AsyncBaseline`), see ``docs/benchmarks.md``.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable

#: What a link sends and receives (``collections.abc.Buffer`` from Python 3.12).
Buffer = bytes | bytearray | memoryview

log = logging.getLogger(__name__)

#: The entry-point group of third-party baselines (name = scheme, value = a Baseline).
GROUP = "sfm.bench_baselines"


@runtime_checkable
class Link(Protocol):
    """One connection, on either side: whole messages in order."""

    def send(self, payload: Buffer) -> None:
        """Send one message (blocks until the library has taken it)."""

    def recv(self) -> Buffer:
        """The next whole message."""

    def close(self) -> None:
        """Close the connection."""


@runtime_checkable
class Listener(Protocol):
    """The receiving side's listening socket, in the child process."""

    #: What the connecting side passes to :meth:`Baseline.connect` (e.g. ``127.0.0.1:PORT``).
    address: str

    def accept(self, timeout: float) -> Link:
        """The first (only) connection, waiting up to ``timeout`` seconds."""

    def close(self) -> None:
        """Stop listening (after the link is closed)."""


@runtime_checkable
class Baseline(Protocol):
    """A bare library moving bytes between two processes on loopback."""

    #: The row name in the table (include the library's version).
    name: str

    def available(self) -> str | None:
        """None if it can run here, else why not (e.g. its library is not installed)."""

    def listen(self) -> Listener:
        """Listen on 127.0.0.1 (receiving/echoing side, in the child process)."""

    def connect(self, address: str) -> Link:
        """Connect to a :class:`Listener`'s ``address``; return once the connection is up."""


class AsyncLink(Protocol):
    """:class:`Link` of an asyncio library: the same methods, as coroutines."""

    async def send(self, payload: Buffer) -> None:
        """Send one message."""

    async def recv(self) -> Buffer:
        """The next whole message."""

    async def close(self) -> None:
        """Close the connection."""


class AsyncListener(Protocol):
    """:class:`Listener` of an asyncio library."""

    address: str

    async def accept(self, timeout: float) -> AsyncLink:
        """The first (only) connection."""

    async def close(self) -> None:
        """Stop listening."""


class AsyncBaseline(Protocol):
    """:class:`Baseline` of an asyncio library: ``listen`` and ``connect`` are coroutines,
    called on the event loop the harness runs in each process."""

    name: str

    def available(self) -> str | None:
        """None if it can run here, else why not."""

    async def listen(self) -> AsyncListener:
        """Listen on 127.0.0.1 (in the child process)."""

    async def connect(self, address: str) -> AsyncLink:
        """Connect to an :class:`AsyncListener`'s ``address``."""


def is_async(baseline: Baseline | AsyncBaseline) -> bool:
    """Whether ``baseline`` is an :class:`AsyncBaseline` (its ``connect`` is a coroutine function)."""
    return inspect.iscoroutinefunction(baseline.connect)


def version(dist: str) -> str:
    """The installed version of ``dist``, or ``?``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    try:
        return _version(dist)
    except PackageNotFoundError:
        return "?"


def missing(module: str) -> str | None:
    """Why ``module`` cannot be imported, or None (found without importing it)."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"{module} is not installed"


def builtin() -> dict[str, Baseline | AsyncBaseline]:
    """The built-in adapters by key (their libraries are imported only when used)."""
    from .grpcio import GrpcioBaseline
    from .pyzmq import PyzmqBaseline
    from .raw import RawBaseline
    from .websockets import WebsocketsBaseline

    return {
        "raw": RawBaseline(),
        "grpcio": GrpcioBaseline(),
        "websockets": WebsocketsBaseline(),
        "pyzmq": PyzmqBaseline(),
    }


#: Which built-in adapter is the baseline of which scheme (a plain scheme; secure schemes
#: are compared with their plain scheme's sfm rows).
FOR_SCHEME = {"tcp": "raw", "grpc": "grpcio", "ws": "websockets", "http": "websockets"}
#: The reference row: measured whenever it is available, compared with tcp's rates.
REFERENCE = "pyzmq"


@dataclass
class Baselines:
    """The baselines of this installation by key, and the entry points that failed to load."""

    by_key: dict[str, Baseline | AsyncBaseline]
    #: scheme -> key of its baseline.
    for_scheme: dict[str, str]
    #: (entry point name, error) of each broken entry point; they are skipped.
    errors: list[tuple[str, str]] = field(default_factory=list)

    def for_(self, scheme: str) -> tuple[str, Baseline | AsyncBaseline] | None:
        """The key and baseline of ``scheme``, or None."""
        key = self.for_scheme.get(scheme)
        return None if key is None else (key, self.by_key[key])


def load() -> Baselines:
    """The built-in baselines plus those of the ``sfm.bench_baselines`` entry points.

    An entry point overrides the built-in baseline of its scheme. One that fails to load, or
    whose object does not implement :class:`Baseline`, is logged and listed in ``errors`` with
    its name, never raised: a broken third-party baseline never stops the bench.
    """
    result = Baselines(builtin(), dict(FOR_SCHEME))
    for ep in entry_points(group=GROUP):
        try:
            obj = ep.load()
            if isinstance(obj, type):
                obj = obj()
            if not isinstance(obj, Baseline):  # checks the members; AsyncBaseline has the same names
                raise TypeError(f"{ep.value} does not implement Baseline (name, available, listen, connect)")
            if inspect.iscoroutinefunction(obj.listen) != is_async(obj):
                raise TypeError(f"{ep.value}: listen and connect must both be coroutines or neither")
        except Exception as e:  # a third party's code: anything may go wrong in it
            log.warning("bench baseline entry point %r skipped: %s: %s", ep.name, type(e).__name__, e)
            result.errors.append((ep.name, f"{type(e).__name__}: {e}"))
            continue
        key = f"ep:{ep.name}"
        result.by_key[key] = obj
        result.for_scheme[ep.name] = key
    return result
