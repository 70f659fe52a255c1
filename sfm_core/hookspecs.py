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

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .conn_manager import ConnManager
    from .driver import Connection, Driver, FrameReceiver
    from .endpoint import Endpoint

PROJECT = "sfm"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- Driver: contributing drivers ---------------------------------------------------------


@hookspec
def sfm_driver_classes() -> dict[str, type[Driver]] | None:
    """Driver classes this plugin serves, by URL scheme: ``{"uds": UdsDriver}``.

    A way to register a driver without packaging it, beside entry points. The registry asks
    every time it resolves a scheme, so a plugin registered at any moment is seen. Each claim
    is shown in ``sfm drivers`` as distribution ``plugin:<plugin name>`` and takes part in the
    same resolution rules as entry points (``docs/plugins.md``): an in-process registration,
    then a preference (``SFM_DRIVERS``), then the distribution sfm ships, then the name that
    sorts first; allow/deny lists name it ``plugin:<plugin name>``. The class is checked as an
    entry point's is (a concrete Driver subclass of a supported contract). Return None or {}
    to contribute nothing; an exception is logged and that plugin skipped.
    """


@hookspec
def sfm_driver_loaded(scheme: str, driver_class: type[Driver]) -> None:
    """A driver class was loaded for ``scheme`` (once per scheme and process)."""


@hookspec
def sfm_connection_state_changed(manager: ConnManager, connection: Connection) -> None:
    """A connection of ``manager`` was created or ended; ``connection.state`` says which."""


@hookspec
def sfm_endpoint_state_changed(manager: ConnManager, endpoint: Endpoint) -> None:
    """A remote endpoint of ``manager`` changed state; ``endpoint.state`` is the new one."""


# -- Connection: admitting a peer ---------------------------------------------------------


@hookspec
def sfm_admit_connection(
    manager: ConnManager, connection: Connection, endpoint_name: str, conn_props: dict
) -> str | None:
    """Whether ``connection`` may complete its handshake as ``endpoint_name``: return a reason
    to refuse it, or None to let it go on.

    Consulted on both sides once the peer has said who it is, before anything is recorded:
    on a listener when its HELLO arrives (before READY is sent), on a connecting side when
    READY arrives. ``conn_props`` are the connection's properties (``peer_addr``; on TLS
    ``peer_cn``, ``tls_version``, ``tls_cipher``): an allow-list by address or certificate
    belongs here. A refusal is logged (WARNING, with the reason), told to an sfm peer (the
    ``refusal`` extension), and closes that connection only; the peer never becomes READY and
    monitors never hear of it. Every implementation is asked until one refuses. An
    implementation that raises refuses the connection (it is a security check: it fails
    closed), and the exception is logged. Runs on the connection's delivery thread: be quick.
    """


# -- FrameReceiver: wrapping a connection's receiver -----------------------------------------


@hookspec
def sfm_wrap_frame_receiver(
    manager: ConnManager, connection: Connection, receiver: FrameReceiver
) -> FrameReceiver | None:
    """A frame receiver to use for ``connection`` in place of ``receiver`` (metrics, tracing,
    capture), or None to leave it.

    The wrapper gets every frame the driver delivers and must pass each, in order, to
    ``receiver`` (subclass :class:`sfm_core.receivers.FrameReceiverWrapper`, which forwards
    everything, and override what you observe). Asked once per connection, when the driver
    reports it, on the driver's thread; wrappers chain in the order pluggy calls the
    implementations. With no implementation the frame path is exactly as without this hook:
    nothing is asked per frame.
    """
