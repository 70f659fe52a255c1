"""The process-wide pluggy plugin manager and safe broadcasting of hook events."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

import pluggy

from . import hookspecs

log = logging.getLogger(__name__)

_pm: pluggy.PluginManager | None = None
_pm_lock = threading.Lock()


def get_plugin_manager() -> pluggy.PluginManager:
    """The plugin manager every ConnManager and driver registry of this process uses."""
    global _pm
    with _pm_lock:
        if _pm is None:
            pm = pluggy.PluginManager(hookspecs.PROJECT)
            pm.add_hookspecs(hookspecs)
            _pm = pm
        return _pm


def register_module_of(obj: Any) -> None:
    """Register the module that defines ``obj`` (a driver class) as a plugin, once."""
    module = sys.modules.get(getattr(obj, "__module__", ""))
    if module is None:
        return
    pm = get_plugin_manager()
    if not pm.is_registered(module):
        try:
            pm.register(module)
        except Exception:  # a broken hookimpl must not stop the driver from working
            log.exception("could not register %s as an sfm plugin", module.__name__)


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
