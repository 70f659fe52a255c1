"""The pass-through frame receiver wrapper ``sfm bench`` measures (``tcp (wrapped receiver)``).

A realistic minimal metrics plugin: its ``sfm_wrap_frame_receiver`` wraps every connection's
receiver in a :class:`CountingReceiver`, which counts the frames of each batch and passes the
batch on. The receiving peer registers it when started with ``--wrap-receiver``; its frame
count comes back with the result, so the bench knows the wrapper was on the path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sfm_core.frames import Payload
from sfm_core.hookspecs import hookimpl
from sfm_core.receivers import FrameReceiverWrapper


class CountingReceiver(FrameReceiverWrapper):
    """Counts frames, then passes each batch on whole (``process_frame`` is not overridden)."""

    frames = 0

    def process_frames(self, frames: Sequence[Payload]) -> None:
        CountingReceiver.frames += len(frames)
        super().process_frames(frames)


class WrapperPlugin:
    """Wraps every connection's frame receiver in a :class:`CountingReceiver`."""

    @hookimpl
    def sfm_wrap_frame_receiver(self, manager: Any, connection: Any, receiver: Any) -> CountingReceiver:
        return CountingReceiver(receiver)


def register() -> None:
    """Register :class:`WrapperPlugin` with this process's plugin manager (plugin ``bench-wrapper``)."""
    from sfm_core.plugins import get_plugin_manager

    pm = get_plugin_manager()
    if pm.get_plugin("bench-wrapper") is None:
        pm.register(WrapperPlugin(), name="bench-wrapper")
