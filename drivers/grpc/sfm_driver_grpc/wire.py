"""The ``streamer.Frame`` message, encoded and decoded by hand.

``Frame { int32 seq = 1; bytes data = 2; }`` is two protobuf fields, so the driver builds
the message bytes itself: one ``b"".join`` of the varint envelope and the SFM frame's
buffers (the one copy gRPC forces, done on the sending thread), and on receipt hands out
``data`` as a memoryview into the received message (no copy). The generated module in
``proto/`` is the reference; the tests check both agree byte for byte.
"""

from __future__ import annotations

from collections.abc import Sequence

from sfm_core import CommError

_SEQ_TAG = b"\x08"  # field 1, varint
_DATA_TAG = b"\x12"  # field 2, length-delimited
#: Most bytes the envelope adds to Frame.data: two tags, a 10-byte varint seq, a 5-byte length.
ENVELOPE_MAX = 17


def _varint(value: int) -> bytes:
    if value < 0:  # int32 negatives are sign-extended to 64 bits on the wire
        value += 1 << 64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL_VARINTS = [_varint(i) for i in range(128 * 128)]


def varint(value: int) -> bytes:
    """The protobuf varint of ``value`` (a cache covers small values)."""
    if 0 <= value < 16384:
        return _SMALL_VARINTS[value]
    return _varint(value)


def envelope(seq: int, data_len: int) -> bytes:
    """The bytes of a Frame message that come before ``data`` (zero values are omitted, as protobuf does)."""
    head = _SEQ_TAG + varint(seq) if seq else b""
    return head + _DATA_TAG + varint(data_len) if data_len else head


def encode(seq: int, bufs: Sequence) -> bytes:
    """One serialized Frame whose ``data`` is ``bufs`` back to back (one copy)."""
    size = sum(b.nbytes if isinstance(b, memoryview) else len(b) for b in bufs)
    return b"".join([envelope(seq, size), *bufs])


def _read_varint(view: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise CommError(CommError.BAD_DATA, "Frame message is cut inside a varint")
        b = view[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 64:
            raise CommError(CommError.BAD_DATA, "Frame message has a varint longer than 10 bytes")


def decode(message: bytes | memoryview) -> tuple[int, memoryview]:
    """Parse a serialized Frame into ``(seq, data)``; unknown fields are skipped as protobuf does.

    Raises ``CommError(BAD_DATA)`` naming what is wrong.
    """
    view = memoryview(message)
    end = view.nbytes
    # The common case, from us and from protobuf (fields in number order): [seq] data.
    pos = 0
    seq = 0
    data = None
    while pos < end:
        key, pos = _read_varint(view, pos, end)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise CommError(CommError.BAD_DATA, "Frame message has a field numbered 0")
        if wire_type == 0:
            value, pos = _read_varint(view, pos, end)
            if field == 1:  # int32, as protobuf reads it: the low 32 bits, signed
                seq = ((value & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000
        elif wire_type == 2:
            size, pos = _read_varint(view, pos, end)
            if pos + size > end:
                raise CommError(
                    CommError.BAD_DATA, f"Frame field {field} says {size} bytes but only {end - pos} follow"
                )
            if field == 2:
                data = view[pos : pos + size]  # the last one wins, as in protobuf
            pos += size
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise CommError(CommError.BAD_DATA, f"Frame message has field {field} of unsupported wire type {wire_type}")
        if pos > end:
            raise CommError(CommError.BAD_DATA, "Frame message is cut inside a field")
    if data is None:
        data = view[0:0]
    return seq, data
