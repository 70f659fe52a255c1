"""The process-wide pluggy plugin manager and safe broadcasting of hook events."""

from __future__ import annotations

import logging
import sys
import threading
import types
from typing import Any

import pluggy

from . import hookspecs

log = logging.getLogger(__name__)

_pm: pluggy.PluginManager | None = None
_pm_lock = threading.Lock()
_register_lock = threading.Lock()


class _PluginManager(pluggy.PluginManager):
    """A plugin manager that takes a module's hook function only once.

    A driver package's ``__init__`` often re-exports the hooks of its driver module
    (``from .driver import sfm_driver_loaded``); both modules are plugins, and the function
    must still be one implementation, or a broadcast hook would be called twice.
    """

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is not None and isinstance(plugin, types.ModuleType):
            function = plugin.__dict__.get(name)
            if function is not None and self._has_impl(function):
                return None
        return opts

    def _has_impl(self, function: Any) -> bool:
        for caller in vars(self.hook).values():
            if isinstance(caller, pluggy.HookCaller):
                if any(impl.function is function for impl in caller.get_hookimpls()):
                    return True
        return False


def get_plugin_manager() -> pluggy.PluginManager:
    """The plugin manager every ConnManager and driver registry of this process uses."""
    global _pm
    with _pm_lock:
        if _pm is None:
            pm = _PluginManager(hookspecs.PROJECT)
            pm.add_hookspecs(hookspecs)
            _pm = pm
        return _pm


def register_module(module: types.ModuleType | None) -> None:
    """Register ``module`` as a plugin, once; a hook function already registered through
    another module (a re-export) is not taken again. A failure is logged, never raised."""
    if module is None:
        return
    pm = get_plugin_manager()
    with _register_lock:  # two registries loading one driver at once register it once
        if pm.is_registered(module):
            return
        try:
            pm.register(module)
        except Exception:  # a broken hookimpl must not stop the driver from working
            log.exception("could not register %s as an sfm plugin", module.__name__)


def register_module_of(obj: Any) -> None:
    """Register the module that defines ``obj`` (a driver class) as a plugin, once."""
    register_module(sys.modules.get(getattr(obj, "__module__", "")))


def register_driver_modules(driver_class: Any, entry_point_module: str | None = None) -> None:
    """Register the plugins of a loaded driver: the module that defines ``driver_class``, then
    the module its entry point names (a package's ``__init__``, say), each once."""
    register_module_of(driver_class)
    if entry_point_module:
        register_module(sys.modules.get(entry_point_module))


def broadcast(hook_name: str, **kwargs: Any) -> None:
    """Call a broadcast hook; a failing implementation is logged, never raised."""
    pm = _pm
    if pm is None:
        return
    hook = getattr(pm.hook, hook_name)
    if not hook.get_hookimpls():
        return
    try:
        hook(**kwargs)
    except Exception:
        log.exception("sfm plugin hook %s failed", hook_name)


def ask_admission(manager: Any, connection: Any, endpoint_name: str, conn_props: dict) -> str | None:
    """The first refusal of an ``sfm_admit_connection`` implementation, or None. An
    implementation that raises refuses (a security check fails closed); it is logged."""
    pm = _pm
    if pm is None:
        return None
    for impl in reversed(pm.hook.sfm_admit_connection.get_hookimpls()):  # pluggy's call order
        try:
            reason = impl.function(
                manager=manager, connection=connection, endpoint_name=endpoint_name, conn_props=conn_props
            )
        except Exception as e:
            log.exception("sfm plugin %s: sfm_admit_connection failed; refusing the connection", impl.plugin_name)
            return f"admission check of plugin {impl.plugin_name} failed ({type(e).__name__})"
        if reason:
            return f"{reason} (plugin {impl.plugin_name})"
    return None


def wrap_frame_receiver(manager: Any, connection: Any, receiver: Any) -> Any:
    """``receiver``, wrapped by every ``sfm_wrap_frame_receiver`` implementation in turn
    (asked once per connection; with none, ``receiver`` itself). A failing one is logged and
    skipped: the connection keeps the receiver it had."""
    pm = _pm
    if pm is None:
        return receiver
    for impl in reversed(pm.hook.sfm_wrap_frame_receiver.get_hookimpls()):
        try:
            wrapped = impl.function(manager=manager, connection=connection, receiver=receiver)
        except Exception:
            log.exception("sfm plugin %s: sfm_wrap_frame_receiver failed", impl.plugin_name)
            continue
        if wrapped is not None:
            receiver = wrapped
    return receiver
