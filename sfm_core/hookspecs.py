"""The pluggy hook contract of sfm (project name ``"sfm"``).

Driver packages provide their :class:`~sfm_core.driver.Driver` subclass through an entry
point in the group ``sfm.drivers`` whose *name* is the URL scheme::

    [project.entry-points."sfm.drivers"]
    tcp = "sfm_driver_tcp:TcpDriver"

When the core loads a driver, it registers with the plugin manager both the module that
defines the driver class and the module the entry point names (``sfm_driver_tcp`` above),
each once, so either may also implement any hook below with ``@sfm_core.hookimpl`` (a hook
function one of them re-exports from the other is still one implementation). A driver that
fails to load, or declares a driver contract this core does not support, is not registered. Other code can
observe the core by registering an object: ``sfm_core.get_plugin_manager().register(obj)``.

Broadcast hooks are called on the thread where the event happened; an implementation must
return quickly and must not raise (an exception is logged and otherwise ignored).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .conn_manager import ConnManager
    from .driver import Connection, Driver
    from .endpoint import Endpoint

PROJECT = "sfm"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def sfm_driver_loaded(scheme: str, driver_class: type[Driver]) -> None:
    """A driver class was loaded for ``scheme`` (once per scheme and process)."""


@hookspec
def sfm_connection_state_changed(manager: ConnManager, connection: Connection) -> None:
    """A connection of ``manager`` was created or ended; ``connection.state`` says which."""


@hookspec
def sfm_endpoint_state_changed(manager: ConnManager, endpoint: Endpoint) -> None:
    """A remote endpoint of ``manager`` changed state; ``endpoint.state`` is the new one."""


@hookspec(firstresult=True)
def sfm_bench_baseline(scheme: str) -> Any:
    """A bare-library baseline for ``sfm bench`` on ``scheme``, or None.

    Return an object with ``name`` (str) and ``run(workload: str, size: int, count: int) ->
    dict`` giving the same measures as the sfm run of that workload (see ``sfm_core.bench``).
    """
