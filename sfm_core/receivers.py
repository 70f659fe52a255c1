"""A base for frame receivers that wrap another (the ``sfm_wrap_frame_receiver`` hook)."""

from __future__ import annotations

from collections.abc import Sequence

from .driver import FrameReceiver
from .frames import Payload


class FrameReceiverWrapper(FrameReceiver):
    """Passes everything to ``inner``; override what you want to observe, and call ``super()``.

    ``process_frames`` is the driver's batch call: a wrapper that only overrides
    ``process_frame`` still sees every frame, at the cost of the batch (one call each).
    """

    def __init__(self, inner: FrameReceiver) -> None:
        self.inner = inner

    def process_frame(self, frame: Payload) -> None:
        self.inner.process_frame(frame)

    def process_frames(self, frames: Sequence[Payload]) -> None:
        if type(self).process_frame is FrameReceiverWrapper.process_frame:
            self.inner.process_frames(frames)  # process_frame is not overridden: keep the batch
        else:
            for frame in frames:
                self.process_frame(frame)

    def bytes_received(self) -> None:
        self.inner.bytes_received()

    def bytes_sent(self) -> None:
        self.inner.bytes_sent()
