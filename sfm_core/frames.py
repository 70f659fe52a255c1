"""Sans-I/O frame codec: the SFM frame prefix, headers and payload, with no sockets in sight.

A frame is ``prefix (16 bytes) | headers (msgpack map) | payload`` (see docs/wire-protocol.md).
Encoding returns a list of buffers so a driver can send the payload as it is (scatter-gather).
:class:`FrameDecoder` turns a byte stream, in any chunking, into whole frames; it owns its
buffers so an I/O layer can ``recv_into`` them directly (the asyncio ``BufferedProtocol`` shape).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Sequence
from enum import IntEnum
from itertools import pairwise
from typing import NamedTuple, Union

import msgpack

from .errors import CommError

Buffer = Union[bytes, bytearray, memoryview]
#: What ``send_frame``/``send_message`` accept: one buffer or a list of buffers sent back to back.
Payload = Union[bytes, bytearray, memoryview, Sequence[bytes | bytearray | memoryview]]

PREFIX = struct.Struct(">IHBBHHHH")
PREFIX_LEN = PREFIX.size  # 16
_LEN_AND_HEADER_LEN = struct.Struct(">IH")

#: The original protocol's frame limit: 2 GiB - 2 MiB.
MAX_FRAME_SIZE = 2 * 1024**3 - 2 * 1024**2
#: The first frame each side receives is the handshake (HELLO or READY): a small map. A
#: stream decoder refuses a bigger first frame, so an unknown peer cannot make a listener
#: reserve a large buffer before it has even said who it is.
HANDSHAKE_MAX_FRAME = 1024 * 1024
#: header_len is a 16-bit field, so encoded headers cannot exceed this.
MAX_HEADER_LEN = 0xFFFF


class FrameType(IntEnum):
    """The ``type`` byte of the prefix."""

    DATA = 1
    FRAG = 2
    ACK = 3
    HELLO = 4
    READY = 5
    PING = 6
    PONG = 7


class Frame(NamedTuple):
    """A decoded frame. ``payload`` is a memoryview into the received buffer, or None if empty."""

    type: int
    flags: int
    app_id: int
    stream_id: int
    sequence: int
    headers: dict | None
    payload: memoryview | None


def payload_length(payload: Payload | None) -> int:
    """Number of bytes in a payload given as one buffer, a list of buffers, or None."""
    if payload is None:
        return 0
    if isinstance(payload, (bytes, bytearray)):
        return len(payload)
    if isinstance(payload, memoryview):
        return payload.nbytes
    return sum(b.nbytes if isinstance(b, memoryview) else len(b) for b in payload)


def payload_buffers(payload: Payload | None) -> list:
    """The payload as a list of buffers (no copies)."""
    if payload is None:
        return []
    if isinstance(payload, (bytes, bytearray, memoryview)):
        payload = [payload]
    # Byte-format views, so len() is the byte count everywhere downstream (drivers sum lens).
    return [_as_bytes_view(b) for b in payload if len(b)]


def _as_bytes_view(buf: Buffer) -> Buffer:
    if isinstance(buf, memoryview) and (buf.format != "B" or buf.ndim != 1):
        try:
            return buf.cast("B")
        except TypeError:
            raise CommError(CommError.BAD_DATA, "payload memoryview must be C-contiguous") from None
    return buf


def encode_headers(headers: dict) -> bytes:
    """msgpack-encode a header map; ``CommError(BAD_DATA)`` if it cannot be or is too large."""
    if not isinstance(headers, dict):
        raise CommError(CommError.BAD_DATA, f"headers must be a dict, got {type(headers).__name__}")
    try:
        encoded = msgpack.packb(headers)
    except (TypeError, ValueError, OverflowError) as e:
        raise CommError(CommError.BAD_DATA, f"headers cannot be encoded with msgpack: {e}") from None
    if len(encoded) > MAX_HEADER_LEN:
        raise CommError(
            CommError.BAD_DATA,
            f"encoded headers are {len(encoded)} bytes; the limit is {MAX_HEADER_LEN} (16-bit header_len)",
        )
    return encoded


def encode_frame(
    frame_type: int,
    app_id: int = 0,
    stream_id: int = 0,
    headers: dict | None = None,
    payload: Payload | None = None,
    *,
    flags: int = 0,
    sequence: int = 0,
    max_frame_size: int = MAX_FRAME_SIZE,
) -> list:
    """Encode a whole frame as a list of buffers: ``[head, *payload_buffers]``.

    The head is the prefix and the msgpack headers; the payload buffers are not touched.
    """
    bufs = payload_buffers(payload)
    encoded = encode_headers(headers) if headers else b""
    length = PREFIX_LEN + len(encoded) + payload_length(bufs)
    if length > max_frame_size:
        check_prefix(length, len(encoded), max_frame_size)
    head = PREFIX.pack(length, len(encoded), frame_type, 0, flags, app_id, stream_id & 0xFFFF, sequence & 0xFFFF)
    return [head + encoded, *bufs]


def check_prefix(length: int, header_len: int, max_frame_size: int) -> None:
    """Raise ``CommError(BAD_DATA)`` if a prefix's sizes are impossible or over the limit."""
    if length < PREFIX_LEN:
        raise CommError(CommError.BAD_DATA, f"frame length {length} is below the 16-byte prefix")
    if length > max_frame_size:
        raise CommError(
            CommError.BAD_DATA, f"frame length {length} exceeds the maximum frame size of {max_frame_size} bytes"
        )
    if header_len > length - PREFIX_LEN:
        raise CommError(
            CommError.BAD_DATA, f"header_len {header_len} exceeds the {length - PREFIX_LEN} bytes after the prefix"
        )


def decode_frame(frame: Buffer, max_frame_size: int = MAX_FRAME_SIZE) -> Frame:
    """Decode one whole frame (as a message transport delivers it, or as FrameDecoder emits it).

    Raises ``CommError(BAD_DATA)`` naming what is wrong if the frame is malformed.
    """
    view = memoryview(frame)
    size = view.nbytes
    if size < PREFIX_LEN:
        raise CommError(CommError.BAD_DATA, f"frame of {size} bytes is shorter than the 16-byte prefix")
    length, header_len, ftype, _reserved, flags, app_id, stream_id, sequence = PREFIX.unpack_from(view)
    check_prefix(length, header_len, max_frame_size)
    if length != size:
        raise CommError(CommError.BAD_DATA, f"frame length field says {length} bytes but the frame has {size}")
    headers = None
    if header_len:
        headers = decode_headers(view[PREFIX_LEN : PREFIX_LEN + header_len])
    body = PREFIX_LEN + header_len
    payload = view[body:] if size > body else None
    return Frame(ftype, flags, app_id, stream_id, sequence, headers, payload)


def decode_headers(data: Buffer) -> dict:
    """Decode a msgpack header map; anything else is ``CommError(BAD_DATA)``."""
    try:
        headers = msgpack.unpackb(data)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise CommError(CommError.BAD_DATA, f"headers are not valid msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(headers, dict):
        raise CommError(CommError.BAD_DATA, f"headers must be a msgpack map, got {type(headers).__name__}")
    return headers


#: Frames from this size on are received into anonymous memory maps: the kernel commits their
#: pages as data arrives, so a prefix that claims 2 GiB costs nothing until 2 GiB really come.
LAZY_FRAME = 16 * 1024 * 1024  # below, bytearrays: freed and reused warm by malloc
#: FrameDecoder copies a read's frames out in one go when they average at most this size.
_SMALL_FRAMES = 2048


def _frame_buffer(length: int) -> bytearray | mmap.mmap:
    """A writable buffer of ``length`` bytes for one large frame."""
    if length >= LAZY_FRAME:
        return mmap.mmap(-1, length)
    return bytearray(length)


class FrameDecoder:
    """Incremental decoder: bytes in, whole frames out.

    Zero-copy use from an I/O layer::

        n = sock.recv_into(decoder.get_buffer())
        frames = decoder.buffer_updated(n)

    Small frames are read many at a time into one reusable buffer and copied out once as
    ``bytes``. That buffer starts at ``initial_size`` (an idle connection costs little) and
    doubles, up to ``buffer_size``, whenever a read fills it. A frame that does not fit in
    half the buffer (or exceeds ``large_frame``) gets its own buffer sized from its prefix (a
    ``bytearray``, or from ``LAZY_FRAME`` (16 MiB) an anonymous ``mmap`` whose pages are
    committed only as data arrives), and :meth:`get_buffer` then hands out the rest of that buffer, so the payload is
    received in place and never copied again.
    """

    def __init__(
        self,
        max_frame_size: int = MAX_FRAME_SIZE,
        buffer_size: int = 256 * 1024,
        large_frame: int = 64 * 1024,
        initial_size: int = 4096,
        first_frame_max: int | None = None,
    ) -> None:
        if large_frame >= buffer_size:
            raise ValueError("large_frame must be below buffer_size")
        self.max_frame_size = max_frame_size
        self._first_frame_max = first_frame_max
        self._large_frame = large_frame
        self._max_size = buffer_size
        self._buf = bytearray(min(initial_size, buffer_size))
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._filled = False
        self._large: bytearray | mmap.mmap | None = None
        self._large_filled = 0

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a whole frame (non-zero at EOF means a cut frame)."""
        if self._large is not None:
            return self._large_filled
        return self._end - self._start

    @property
    def in_large_frame(self) -> bool:
        """True while a large frame is being received into its own buffer."""
        return self._large is not None

    def get_buffer(self) -> memoryview:
        """A writable, non-empty buffer to receive the next bytes into."""
        if self._large is not None:
            return memoryview(self._large)[self._large_filled :]
        size = len(self._buf)
        if self._filled and size < self._max_size:
            # The last read filled the buffer: data is streaming in, read more per syscall.
            self._resize(min(self._max_size, size * 2))
        elif size - self._end < size // 2:
            # Room runs short: move the partial frame (under half the buffer) to the front.
            self._resize(size)
        self._filled = False
        return self._view[self._end :]

    def _resize(self, size: int) -> None:
        n = self._end - self._start
        if size == len(self._buf):
            self._buf[:n] = self._view[self._start : self._end]
        else:
            buf = bytearray(size)
            buf[:n] = self._view[self._start : self._end]
            self._view.release()
            self._buf, self._view = buf, memoryview(buf)
        self._start, self._end = 0, n

    def buffer_updated(self, nbytes: int) -> list:
        """Account for ``nbytes`` written into the last :meth:`get_buffer`; return whole frames."""
        if self._large is not None:
            self._large_filled += nbytes
            if self._large_filled < len(self._large):
                return []
            frame = self._large
            self._large = None
            return [frame]
        self._end = end = self._end + nbytes
        self._filled = end == len(self._buf)
        if self._start == 0 and end >= PREFIX_LEN and self._first_frame_max is None:
            # The buffer holds exactly one whole, valid frame: every read of request/response
            # (about 1 us a message less than finding frames in general, measured).
            length, header_len = _LEN_AND_HEADER_LEN.unpack_from(self._buf)
            if length == end and length <= self.max_frame_size and header_len <= length - PREFIX_LEN:
                self._end = 0
                return [bytes(self._view[:end])]
        return self._parse()

    def feed(self, data: Buffer) -> list:
        """Decode a chunk of the stream (copies it in; prefer get_buffer/buffer_updated)."""
        src = memoryview(data).cast("B")
        frames: list = []
        while src.nbytes:
            dst = self.get_buffer()
            n = min(dst.nbytes, src.nbytes)
            dst[:n] = src[:n]
            src = src[n:]
            frames.extend(self.buffer_updated(n))
        return frames

    def _parse(self) -> list:
        view, start, end = self._view, self._start, self._end
        buf = self._buf
        unpack = _LEN_AND_HEADER_LEN.unpack_from
        limit = self.max_frame_size
        first = self._first_frame_max
        if first is not None and end - start >= PREFIX_LEN:
            # The first frame only (the handshake) has its own, lower limit.
            self._first_frame_max = None
            length, header_len = unpack(buf, start)
            first_limit = min(limit, first)
            if length > first_limit:
                self._start, self._end = start, end
                check_prefix(length, header_len, first_limit)
        # Find the whole frames first (every prefix checked), then copy them out.
        ends = [0]  # where each frame ends, from start
        mark = ends.append
        pos = start
        length = 0
        while end - pos >= PREFIX_LEN:
            length, header_len = unpack(buf, pos)
            if length < PREFIX_LEN or length > limit or header_len > length - PREFIX_LEN:
                self._start, self._end = pos, end
                check_prefix(length, header_len, limit)
            if end - pos < length:
                break
            pos += length
            mark(pos - start)
        frames: list = []
        n = len(ends) - 1
        if n > 1 and pos - start <= _SMALL_FRAMES * n:
            # Small frames: one copy of them all, then a bytes slice each (half the cost of
            # bytes(view[a:b]), which makes a memoryview per frame). Each frame is still a
            # bytes of its own: a payload a receiver keeps holds only its frame.
            chunk = bytes(view[start:pos])
            frames = [chunk[a:b] for a, b in pairwise(ends)]
        elif n:
            frames = [bytes(view[start + a : start + b]) for a, b in pairwise(ends)]
        start = pos
        if end - start >= PREFIX_LEN and length > min(self._large_frame, len(buf) // 2):
            # The next frame will not fit: it gets its own buffer, and the rest is received in place.
            have = end - start
            large = _frame_buffer(length)
            large[:have] = view[start:end]
            self._large, self._large_filled = large, have
            start = end = 0
        if start == end:
            start = end = 0
        self._start, self._end = start, end
        return frames
