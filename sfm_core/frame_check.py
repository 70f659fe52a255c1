"""Whole-frame checks for message transports (WebSocket, gRPC, QUIC streams of messages, ...).

A stream transport (TCP) cuts frames out of a byte stream with :class:`sfm_core.frames.FrameDecoder`.
A message transport delivers whole messages, and the rule is that a message is exactly one
SFM frame, or, where the peers agreed on it (gRPC's ``grpc-batch`` extension), a batch of
whole frames back to back. :class:`MessageFrames` checks that rule for one connection,
with the same words in every driver: the length prefix against the message size, the
header length, ``max_frame_size``, and ``first_frame_max`` for the first frame the
connection receives (the handshake: at most :data:`sfm_core.frames.HANDSHAKE_MAX_FRAME`).
A broken message raises ``CommError(BAD_DATA)`` saying what is wrong; the driver closes that
connection (only) and logs the message. Example::

    self.frames = MessageFrames(max_frame_size, what="the WebSocket message")
    frame = self.frames.one(message)            # or .split(message, batch=True)
    self.process_frames([frame])
"""

from __future__ import annotations

from typing import Any

from .errors import CommError
from .frames import _LEN_AND_HEADER_LEN, HANDSHAKE_MAX_FRAME, PREFIX_LEN, Buffer, check_prefix

__all__ = ["MessageFrames"]

_unpack = _LEN_AND_HEADER_LEN.unpack_from


class MessageFrames:
    """Checks the messages one connection receives (loop thread, or the one reading thread).

    ``max_frame_size`` is the largest frame accepted; ``first_frame_max`` (default
    :data:`~sfm_core.frames.HANDSHAKE_MAX_FRAME`; None: no extra limit) bounds the first
    frame only, as :class:`~sfm_core.frames.FrameDecoder` does for a stream. ``what`` names a
    message in errors: ``"the WebSocket message"``, ``"Frame.data"``.
    """

    __slots__ = ("_first_max", "max_frame_size", "what")

    def __init__(
        self, max_frame_size: int, *, what: str = "the message", first_frame_max: int | None = HANDSHAKE_MAX_FRAME
    ) -> None:
        self.max_frame_size = max_frame_size
        self.what = what
        self._first_max = first_frame_max

    def _limit(self) -> int:
        limit = self.max_frame_size
        first = self._first_max
        if first is not None:
            self._first_max = None
            if first < limit:
                return first
        return limit

    def _short(self, size: int) -> CommError:
        return CommError(CommError.BAD_DATA, f"{self.what} of {size} bytes is shorter than the 16-byte SFM prefix")

    def _mismatch(self, length: int, size: int) -> CommError:
        return CommError(CommError.BAD_DATA, f"frame length field says {length} bytes but {self.what} has {size}")

    def one(self, message: Any) -> Any:
        """``message`` if it is exactly one well-formed frame; else ``CommError(BAD_DATA)``."""
        size = len(message)
        if size < PREFIX_LEN:
            raise self._short(size)
        length, header_len = _unpack(message)
        if (
            length != size
            or header_len > length - PREFIX_LEN
            or length > self.max_frame_size
            or self._first_max is not None
        ):
            # The first frame, or a broken one: the full checks, in their order, with their words.
            check_prefix(length, header_len, self._limit())
            if length != size:
                raise self._mismatch(length, size)
        return message

    def split(self, message: Buffer, batch: bool = False) -> list:
        """The frame(s) in ``message``: ``[message]`` for one frame, or with ``batch`` the
        frames of a batch as memoryviews into it (no copy). ``CommError(BAD_DATA)`` if it is
        not one whole frame (nor, with ``batch``, whole frames back to back)."""
        size = len(message)
        if size < PREFIX_LEN:
            raise self._short(size)
        length, header_len = _unpack(message, 0)
        if (
            length < PREFIX_LEN
            or header_len > length - PREFIX_LEN
            or length > self.max_frame_size
            or self._first_max is not None
        ):
            check_prefix(length, header_len, self._limit())
        if length == size:
            return [message]
        if length > size or not batch:
            raise self._mismatch(length, size)
        view = message if isinstance(message, memoryview) else memoryview(message)
        limit = self.max_frame_size
        frames = [view[:length]]
        pos = length
        while pos < size:
            if size - pos < PREFIX_LEN:
                raise CommError(
                    CommError.BAD_DATA, f"batched {self.what} ends with {size - pos} bytes, not a whole frame"
                )
            length, header_len = _unpack(view, pos)
            if length < PREFIX_LEN or length > limit or header_len > length - PREFIX_LEN:
                check_prefix(length, header_len, limit)  # raises, naming what is wrong
            if pos + length > size:
                raise CommError(
                    CommError.BAD_DATA,
                    f"batched frame at offset {pos} says {length} bytes but only {size - pos} are left in {self.what}",
                )
            frames.append(view[pos : pos + length])
            pos += length
        return frames
