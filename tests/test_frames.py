"""The sans-I/O frame codec: encoding, validation, and stream decoding in any chunking."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfm_core import CommError, FrameDecoder, FrameType
from sfm_core.frames import MAX_HEADER_LEN, PREFIX, PREFIX_LEN, decode_frame, encode_frame

header_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=20), st.binary(max_size=20)),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)
headers_st = st.one_of(st.none(), st.dictionaries(st.text(max_size=10), header_values, max_size=5))
frames_st = st.tuples(
    st.sampled_from(list(FrameType)),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    headers_st,
    st.binary(max_size=3000),
)


def _bytes(ftype: int, app_id: int, stream_id: int, headers: dict | None, payload: bytes) -> bytes:
    return b"".join(encode_frame(ftype, app_id, stream_id, headers, payload))


@given(frames_st)
def test_round_trip(spec: tuple) -> None:
    ftype, app_id, stream_id, headers, payload = spec
    frame = decode_frame(_bytes(*spec))
    assert (frame.type, frame.app_id, frame.stream_id) == (ftype, app_id, stream_id)
    assert frame.headers == (headers or None)
    assert (bytes(frame.payload) if frame.payload is not None else b"") == payload
    if not payload:
        assert frame.payload is None  # no bytes means "no payload"


def test_prefix_layout_is_the_wire_documents() -> None:
    data = b"".join(encode_frame(FrameType.DATA, 7, 17, {"a": 1}, b"xyz", sequence=3))
    hb = msgpack.packb({"a": 1})
    assert data[:PREFIX_LEN] == struct.pack(">IHBBHHHH", 16 + len(hb) + 3, len(hb), 1, 0, 0, 7, 17, 3)
    assert data[PREFIX_LEN:] == hb + b"xyz"


def test_payload_as_list_of_buffers_is_sent_back_to_back() -> None:
    parts = [b"ab", bytearray(b"cd"), memoryview(b"ef")]
    bufs = encode_frame(FrameType.DATA, 1, 17, None, parts)
    assert bufs[1:] == parts  # no copy: the very same objects
    assert bytes(decode_frame(b"".join(bufs)).payload) == b"abcdef"


@settings(max_examples=200)
@given(st.lists(frames_st, min_size=1, max_size=6), st.data())
def test_any_split_of_the_stream_gives_the_same_frames(specs: list, data: st.DataObject) -> None:
    stream = b"".join(_bytes(*s) for s in specs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = FrameDecoder(buffer_size=4096, large_frame=1024)
    out = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        out.extend(decoder.feed(stream[prev:cut]))
        prev = cut
    assert [bytes(f) for f in out] == [_bytes(*s) for s in specs]
    assert decoder.pending == 0


@settings(max_examples=100)
@given(st.lists(frames_st, min_size=1, max_size=6))
def test_one_whole_frame_per_read_gives_each_frame(specs: list) -> None:
    # Request/response: every read holds exactly one frame (the decoder's shortest path), the
    # first one under the first-frame limit as on a connection.
    decoder = FrameDecoder(buffer_size=1 << 16, large_frame=1 << 14, first_frame_max=1 << 14)
    got = []
    for spec in specs:
        got += decoder.feed(_bytes(*spec))
        assert decoder.pending == 0
    # Kept until now while the buffer was reused: each is bytes of its own, not a view into it.
    assert all(type(f) is bytes for f in got)
    assert got == [_bytes(*s) for s in specs]


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (PREFIX.pack(20, 5, 1, 0, 0, 0, 0, 0) + b"abcd", "header_len 5 exceeds the 4 bytes after the prefix"),
        (PREFIX.pack(100, 0, 1, 0, 0, 0, 0, 0) + bytes(84), "exceeds the maximum frame size of 64"),
    ],
    ids=["header_len", "max_frame_size"],
)
def test_a_bad_frame_alone_in_a_read_is_refused_as_in_a_stream(frame: bytes, message: str) -> None:
    decoder = FrameDecoder(max_frame_size=64, buffer_size=4096, large_frame=1024)
    decoder.feed(PREFIX.pack(16, 0, 1, 0, 0, 0, 0, 0))  # a good first frame
    with pytest.raises(CommError, match=message):
        decoder.feed(frame)


@settings(max_examples=300)
@given(st.binary(max_size=2000), st.integers(1, 100))
def test_random_bytes_raise_nothing_but_commerror(data: bytes, chunk: int) -> None:
    decoder = FrameDecoder(max_frame_size=1 << 20, buffer_size=4096, large_frame=1024)
    try:
        for i in range(0, len(data), chunk):
            for frame in decoder.feed(data[i : i + chunk]):
                decode_frame(frame)
    except CommError as e:
        assert e.code == CommError.BAD_DATA


@given(st.binary(max_size=200))
def test_decode_frame_of_random_bytes_raises_only_commerror(data: bytes) -> None:
    try:
        decode_frame(data)
    except CommError as e:
        assert e.code == CommError.BAD_DATA


@pytest.mark.parametrize(
    ("prefix", "message"),
    [
        (PREFIX.pack(15, 0, 1, 0, 0, 0, 0, 0), "below the 16-byte prefix"),
        (PREFIX.pack(2**31, 0, 1, 0, 0, 0, 0, 0), "exceeds the maximum frame size of 1048576"),
        (PREFIX.pack(20, 5, 1, 0, 0, 0, 0, 0), "header_len 5 exceeds the 4 bytes after the prefix"),
    ],
)
def test_bad_prefix_is_rejected_with_a_clear_message(prefix: bytes, message: str) -> None:
    decoder = FrameDecoder(max_frame_size=1 << 20)
    with pytest.raises(CommError, match=message) as err:
        decoder.feed(prefix + b"\0" * 8)
    assert err.value.code == CommError.BAD_DATA


def test_large_frame_is_received_into_one_buffer_sized_from_its_prefix() -> None:
    decoder = FrameDecoder(buffer_size=4096, large_frame=1024)
    frame = _bytes(FrameType.DATA, 1, 17, None, bytes(range(256)) * 100)
    decoder.feed(frame[:100])
    buf = decoder.get_buffer()
    assert len(buf) == len(frame) - 100  # exactly the rest of this frame: recv_into lands in place
    buf[:] = frame[100:]
    [out] = decoder.buffer_updated(len(buf))
    assert isinstance(out, bytearray) and out == frame


def test_length_field_that_lies_about_a_whole_frame() -> None:
    frame = bytearray(_bytes(FrameType.DATA, 1, 17, None, b"abc"))
    frame[3] += 1
    with pytest.raises(CommError, match="says 20 bytes but the frame has 19"):
        decode_frame(bytes(frame))


def test_headers_that_are_not_a_map_are_bad_data() -> None:
    hb = msgpack.packb([1, 2])
    data = PREFIX.pack(16 + len(hb), len(hb), 1, 0, 0, 1, 17, 1) + hb
    with pytest.raises(CommError, match="headers must be a msgpack map, got list"):
        decode_frame(data)


def test_oversized_headers_name_the_limit() -> None:
    with pytest.raises(CommError, match=f"limit is {MAX_HEADER_LEN}") as err:
        encode_frame(FrameType.DATA, 1, 17, {"big": "x" * 70000}, b"")
    assert err.value.code == CommError.BAD_DATA


def test_unencodable_headers_are_bad_data() -> None:
    with pytest.raises(CommError, match="cannot be encoded"):
        encode_frame(FrameType.DATA, 1, 17, {"obj": object()}, b"")


def test_frame_over_the_maximum_is_refused_before_sending() -> None:
    with pytest.raises(CommError, match="exceeds the maximum frame size of 100"):
        encode_frame(FrameType.DATA, 1, 17, None, b"x" * 100, max_frame_size=100)


def test_decoder_buffer_starts_small_and_grows_only_while_data_streams() -> None:
    decoder = FrameDecoder(buffer_size=64 * 1024, large_frame=16 * 1024, initial_size=4096)
    assert len(decoder.get_buffer()) == 4096  # an idle connection holds 4 KiB, not 64
    frame = _bytes(FrameType.DATA, 1, 17, None, b"x" * 100)
    stream = frame * 2000
    sizes = set()
    out = 0
    pos = 0
    while pos < len(stream):
        buf = decoder.get_buffer()
        sizes.add(len(buf))
        n = min(len(buf), len(stream) - pos)
        buf[:n] = stream[pos : pos + n]
        pos += n
        out += len(decoder.buffer_updated(n))
    assert out == 2000
    assert max(sizes) <= 64 * 1024 and max(sizes) > 32 * 1024  # grew to the cap, not past it


def test_first_frame_limit_applies_to_the_first_frame_only() -> None:
    small = _bytes(FrameType.HELLO, 0, 1, None, b"h" * 100)
    big = _bytes(FrameType.DATA, 1, 17, None, b"d" * 5000)
    decoder = FrameDecoder(first_frame_max=1000)
    assert [bytes(f) for f in decoder.feed(small + big)] == [small, big]
    with pytest.raises(CommError, match="maximum frame size of 1000"):
        FrameDecoder(first_frame_max=1000).feed(big)
