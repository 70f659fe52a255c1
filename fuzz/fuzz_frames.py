"""Fuzz the frame codec (sfm_core/frames.py): decode_frame, the header codec, FrameDecoder, encode_frame.

Run: ``python fuzz/fuzz_frames.py [libFuzzer flags] [corpus dirs]`` (see docs/fuzzing.md).

The first input byte picks a mode:

* ``decode``: ``decode_frame`` on the rest. Only ``CommError`` escapes; a decoded frame's
  fields are its prefix's; re-encoding it gives the same bytes whenever the codec can (reserved
  byte 0, headers absent or in msgpack's own encoding of the map they decode to), and in any
  case a frame that decodes to the same thing.
* ``headers``: ``decode_headers`` on the rest: only ``CommError``; ``encode_headers`` of the map
  decodes back to it.
* ``stream``: ``FrameDecoder`` fed the rest of the input through ``get_buffer()``/
  ``buffer_updated(n)`` (or ``feed``) in fuzzer-chosen chunk sizes, with fuzzer-chosen limits
  and buffer sizes. Checked against a reference split of the same bytes: the same frames, in
  order, byte for byte (on a bad prefix: a leading part of them, as the frames parsed in the
  same call as the bad prefix are not returned); a ``CommError`` exactly when the reference
  finds a bad prefix, and nothing else; a frame's own buffer is exactly its announced length (within the limit, and
  within ``first_frame_max`` before the first frame); the shared buffer never outgrows
  ``buffer_size``, nor, before the first frame, its initial size (or 32 bytes, to hold a
  prefix); ``get_buffer()`` is never empty.
* ``encode``: ``encode_frame`` of fuzzer-chosen fields (in their wire ranges) decodes, whole and
  through a ``FrameDecoder``, to the same fields; it refuses only with ``CommError`` and
  exactly for a frame over the limit, headers too large or that msgpack cannot encode, or a
  strided non-byte memoryview payload. (A strided *byte* memoryview is passed through as it is
  and fails later in the driver; not generated here, see docs/fuzzing.md.)
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fuzzinput import Input, fuzz, instrumented

with instrumented(__name__ == "__main__"):
    import msgpack

    from sfm_core.errors import CommError
    from sfm_core.frames import (
        HANDSHAKE_MAX_FRAME,
        MAX_FRAME_SIZE,
        MAX_HEADER_LEN,
        PREFIX,
        PREFIX_LEN,
        FrameDecoder,
        decode_frame,
        decode_headers,
        encode_frame,
        encode_headers,
    )

MAX_SIZES = (MAX_FRAME_SIZE, HANDSHAKE_MAX_FRAME, 70_000, 4096, 300, 40, 17, 16, 0)
FIRST_MAX = (None, HANDSHAKE_MAX_FRAME, 5000, 1000, 64, 16, 0)
#: (buffer_size, large_frame, initial_size): the default, the benchmark's, and tiny ones.
BUFFERS = ((256 * 1024, 64 * 1024, 4096), (4096, 2048, 4096), (64, 16, 8), (128, 100, 1), (1024, 8, 16))


def _packed(headers) -> bytes:
    return msgpack.packb(headers) if headers else b""


def _fields(frame) -> tuple:
    payload = None if frame.payload is None else bytes(frame.payload)
    return frame.type, frame.flags, frame.app_id, frame.stream_id, frame.sequence, _packed(frame.headers), payload


# -- decode ----------------------------------------------------------------------------------


def check_decode(data: bytes, max_size: int) -> None:
    try:
        frame = decode_frame(data, max_size)
    except CommError as e:
        assert e.code == CommError.BAD_DATA, e
        return
    length, header_len, ftype, reserved, flags, app_id, stream_id, sequence = PREFIX.unpack_from(data)
    assert PREFIX_LEN <= length == len(data) <= max_size
    assert (frame.type, frame.flags, frame.app_id, frame.stream_id, frame.sequence) == (
        ftype,
        flags,
        app_id,
        stream_id,
        sequence,
    )
    body = PREFIX_LEN + header_len
    assert (frame.payload is None) == (length == body)
    if frame.payload is not None:
        assert bytes(frame.payload) == data[body:]
    assert (frame.headers is None) == (header_len == 0)
    assert frame.headers is None or isinstance(frame.headers, dict)

    repacked = _packed(frame.headers)
    if len(repacked) > MAX_HEADER_LEN:  # float32s come back as float64s: can outgrow 16 bits
        try:
            encode_frame(ftype, app_id, stream_id, frame.headers, frame.payload, flags=flags, sequence=sequence)
        except CommError as e:
            assert e.code == CommError.BAD_DATA
            return
        raise AssertionError("encode_frame took headers over MAX_HEADER_LEN")
    out = b"".join(encode_frame(ftype, app_id, stream_id, frame.headers, frame.payload, flags=flags, sequence=sequence))
    if reserved == 0 and repacked == data[PREFIX_LEN:body]:
        assert out == data, (out.hex(), data.hex())
    assert _fields(decode_frame(out)) == _fields(frame)


def check_headers(data: bytes) -> None:
    try:
        headers = decode_headers(data)
    except CommError as e:
        assert e.code == CommError.BAD_DATA, e
        return
    assert isinstance(headers, dict)
    try:
        encoded = encode_headers(headers)
    except CommError as e:
        assert e.code == CommError.BAD_DATA and len(msgpack.packb(headers)) > MAX_HEADER_LEN, e
        return
    assert encoded == msgpack.packb(headers)
    assert msgpack.packb(decode_headers(encoded)) == encoded


# -- the stream decoder ----------------------------------------------------------------------


def reference_split(stream: bytes, max_size: int, first_max: int | None):
    """(frames, announced lengths of those frames and of a cut last one, error offset or None)."""
    frames, announced, pos = [], [], 0
    while len(stream) - pos >= PREFIX_LEN:
        length, header_len = PREFIX.unpack_from(stream, pos)[:2]
        limit = max_size if (first_max is None or frames) else min(max_size, first_max)
        if length < PREFIX_LEN or length > limit or header_len > length - PREFIX_LEN:
            return frames, announced, pos
        announced.append(length)
        if len(stream) - pos < length:
            break
        frames.append(stream[pos : pos + length])
        pos += length
    return frames, announced, None


def check_stream(inp: Input) -> None:
    max_size = inp.choice(MAX_SIZES)
    first_max = inp.choice(FIRST_MAX)
    buffer_size, large_frame, initial = inp.choice(BUFFERS)
    use_feed = inp.byte() % 4 == 0
    chunks = []
    for _ in range(inp.byte() % 8):
        size = inp.byte()
        if size >= 0xF0:
            size = inp.uint(3)
        chunks.append(max(size, 1))
    stream = inp.rest()

    expected, announced, error_at = reference_split(stream, max_size, first_max)
    dec = FrameDecoder(max_size, buffer_size, large_frame, initial, first_frame_max=first_max)
    got: list = []
    start_size = len(dec._buf)

    def check_buffers() -> None:
        assert len(dec._buf) <= buffer_size
        if not got:  # it may only grow to hold a whole prefix
            assert len(dec._buf) <= max(start_size, 2 * PREFIX_LEN), "the shared buffer grew before the first frame"
        if dec._large is not None:
            assert len(got) < len(announced), "a frame buffer for no announced frame"
            assert len(dec._large) == announced[len(got)], (len(dec._large), announced[len(got)])
            assert len(dec._large) <= max_size
            if not got and first_max is not None:
                assert len(dec._large) <= first_max
            assert dec._large_filled < len(dec._large)

    pos, step = 0, 0
    raised = None
    try:
        while pos < len(stream):
            want = chunks[step % len(chunks)] if chunks else len(stream)
            step += 1
            if use_feed:
                chunk = stream[pos : pos + want]
                pos += len(chunk)
                got.extend(dec.feed(chunk))
            else:
                buf = dec.get_buffer()
                assert isinstance(buf, memoryview) and not buf.readonly and buf.nbytes > 0
                check_buffers()
                n = min(buf.nbytes, want, len(stream) - pos)
                buf[:n] = stream[pos : pos + n]
                pos += n
                got.extend(dec.buffer_updated(n))
            check_buffers()
    except CommError as e:
        assert e.code == CommError.BAD_DATA, e
        raised = e

    got_bytes = [bytes(f) for f in got]
    if raised is None:
        assert got_bytes == expected, "the decoder split the stream differently from the reference"
    else:  # the good frames parsed in the same call as the bad prefix go down with the CommError
        assert got_bytes == expected[: len(got_bytes)], "the decoder split the stream differently from the reference"
    for frame in got:
        assert isinstance(frame, (bytes, bytearray)) or hasattr(frame, "madvise")  # bytes, own buffer, mmap
    if error_at is None:
        assert raised is None, f"CommError on a good stream: {raised}"
        assert dec.pending == len(stream) - sum(map(len, expected))
        assert dec.in_large_frame == (dec._large is not None)
    else:
        assert raised is not None, f"no CommError for the bad prefix at offset {error_at}"
    for frame in got_bytes:
        check_decode(frame, max_size)


# -- encode ----------------------------------------------------------------------------------


def _headers(inp: Input):
    kind = inp.byte() % 4
    if kind == 0:
        return None
    if kind == 1:
        try:
            return decode_headers(inp.sized())
        except CommError:
            return None
    if kind == 2:  # a big map: around the 16-bit header_len limit
        return {"k": b"x" * (MAX_HEADER_LEN - 16 + inp.byte())}
    headers: dict = {}
    for _ in range(3):
        key, kind = inp.text(8), inp.byte() % 8
        if kind == 0:
            headers[key] = inp.uint(4)
        elif kind == 1:
            headers[key] = inp.text()
        elif kind == 2:
            headers[key] = inp.sized()
        else:  # the last one msgpack cannot encode: encode_frame must refuse it with BAD_DATA
            headers[key] = (None, 1.5, [1, "a"], {"n": {}}, {1, 2})[kind - 3]
    return headers


def _payload(inp: Input):
    data = inp.sized() * (1 + inp.byte() % 4)
    kind = inp.byte() % 5
    if kind == 0:
        return data or None
    if kind == 1:
        return bytearray(data)
    if kind == 2:
        return memoryview(data)
    if kind == 3 and len(data) % 2 == 0:
        view = memoryview(data).cast("H")  # not byte-format: the codec must count bytes
        return view[::2] if inp.bool() else view  # ... or refuse a strided one
    cut = inp.byte() % (len(data) + 1)
    return [data[:cut], bytearray(data[cut:]), b""]


def check_encode(inp: Input) -> None:
    ftype, flags = inp.byte(), inp.uint(2)
    app_id, stream_id, sequence = inp.uint(2), inp.uint(3), inp.uint(3)  # the last two are masked
    max_size = inp.choice(MAX_SIZES)
    headers = _headers(inp)
    payload = _payload(inp)
    raw_payload = (
        b"" if payload is None else b"".join(bytes(b) for b in (payload if isinstance(payload, list) else [payload]))
    )
    try:
        packed = _packed(headers)
    except TypeError:
        packed = None  # not encodable
    length = PREFIX_LEN + len(packed or b"") + len(raw_payload)
    must_refuse = (
        packed is None
        or len(packed) > MAX_HEADER_LEN
        or (isinstance(payload, memoryview) and not payload.contiguous and len(payload) > 0)
        or length > max_size
    )
    try:
        bufs = encode_frame(
            ftype, app_id, stream_id, headers, payload, flags=flags, sequence=sequence, max_frame_size=max_size
        )
    except CommError as e:
        assert e.code == CommError.BAD_DATA, e
        assert must_refuse, f"refused a good frame: {e}"
        return
    assert not must_refuse, "encoded a frame it should have refused"
    data = b"".join(bufs)
    assert len(data) == length
    frame = decode_frame(data, max_size)
    assert _fields(frame) == (
        ftype,
        flags,
        app_id,
        stream_id & 0xFFFF,
        sequence & 0xFFFF,
        packed,
        raw_payload or None,
    )
    check_decode(data, max_size)
    frames = FrameDecoder(max_size).feed(data + data)
    assert [bytes(f) for f in frames] == [data, data]


def TestOneInput(data: bytes) -> None:
    inp = Input(data)
    mode = inp.byte() % 4
    if mode == 0:
        max_size = MAX_FRAME_SIZE if inp.byte() % 2 else inp.choice(MAX_SIZES)
        check_decode(inp.rest(), max_size)
    elif mode == 1:
        check_headers(inp.rest())
    elif mode == 2:
        check_stream(inp)
    else:
        check_encode(inp)


if __name__ == "__main__":
    fuzz(TestOneInput)
