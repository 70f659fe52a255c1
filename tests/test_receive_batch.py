"""The batch receive path (``ConnManager.process_frames_task``, ``FrameDecoder._parse``)
against the per-frame path it replaces, as an oracle.

``process_frames_task`` decodes and delivers well-formed DATA frames of an OPEN session in
one loop and hands everything else to ``process_frame_task``; whatever the mix of frames,
the receivers, the log, the frames sent back and the session must end up exactly as with
one ``process_frame_task`` call per frame. The decoder's two-pass parse must cut the same
frames, refuse the same prefixes and leave the same state as the one-pass original.
"""

from __future__ import annotations

import logging
import struct
import time
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfm_core import CommError, ConnManager, Endpoint, FrameDecoder, FrameType, Message, MessageReceiver
from sfm_core.delivery import Dispatcher
from sfm_core.driver import Connection, Mode
from sfm_core.endpoint_table import SfmEndpoint
from sfm_core.frame_check import MessageFrames
from sfm_core.frames import PREFIX, PREFIX_LEN, _frame_buffer, check_prefix, encode_frame
from sfm_core.handshake import PeerHello
from sfm_core.session import Session, State
from sfm_core.sfm_connection import SfmConnection, SfmFrameReceiver

MAX_FRAME = 4096


class FakeConnection(Connection):
    """Records what the core sends back (PONGs, refusals) and whether it was closed."""

    inline_delivery = True

    def __init__(self) -> None:
        super().__init__(None)
        self.name = "CN-test"  # the same in the rig under test and the oracle's
        self.sent: list[bytes] = []
        self.closed = False

    def get_conn_properties(self) -> dict:
        return {"peer_addr": "127.0.0.1:1"}

    def close(self) -> None:
        self.closed = True

    def send_frame(self, frame: Any) -> None:
        self.sent.append(b"".join(frame) if isinstance(frame, list) else bytes(frame))


class Recorder(MessageReceiver):
    """Keeps what it is given; raises for payloads that start with ``b"boom"``."""

    def __init__(self, log: list) -> None:
        self.log = log

    def process_message(self, endpoint: Endpoint, connection: Any, app_id: int, message: Message) -> None:
        payload = message.payload
        self.log.append(
            (
                endpoint.name,
                connection.name,
                app_id,
                type(message),
                message.headers,
                message.get_header("k"),
                None if payload is None else (type(payload), payload.readonly, bytes(payload)),
            )
        )
        if payload is not None and bytes(payload[:4]) == b"boom":
            raise ValueError("the app's own bug")


class Rig:
    """One OPEN connection of an unstarted ConnManager, fed frames by hand."""

    def __init__(self, manager_class: type[ConnManager] = ConnManager) -> None:
        self.manager = manager_class(Endpoint("server"), max_frame_size=MAX_FRAME)
        self.delivered: list = []
        self.manager.register_message_receiver(1, Recorder(self.delivered))
        self.manager.register_message_receiver(2, Recorder(self.delivered))
        self.conn = FakeConnection()
        session = Session("server", {}, active=False, now=time.monotonic(), max_frame_size=MAX_FRAME)
        session.adopt(PeerHello("site-1", {}, frozenset()))
        self.sfm_conn = SfmConnection(self.conn, session, Mode.PASSIVE)
        sfm_ep = SfmEndpoint(Endpoint("site-1"))
        sfm_ep.connections = [self.sfm_conn]
        self.sfm_conn.sfm_endpoint = sfm_ep

    def outcome(self) -> tuple:
        session = self.sfm_conn.session
        return (
            self.delivered,
            self.conn.sent,
            self.conn.closed,
            self.sfm_conn.closing,
            session.state,
            session.close_reason,
            session.pongs_received,
        )


class LogRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelname, record.getMessage()))


def run_logged(fn: Any) -> list:
    logger = logging.getLogger("sfm_core")
    handler = LogRecords()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        fn()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return handler.records


def frame(ftype: int, app_id: int = 0, headers: dict | None = None, payload: bytes = b"", seq: int = 1) -> bytes:
    return b"".join(encode_frame(ftype, app_id, 17, headers, payload, sequence=seq))


def with_header_bytes(app_id: int, header: bytes, payload: bytes = b"p") -> bytes:
    """A DATA frame whose header bytes are given as they are (valid or not)."""
    length = PREFIX_LEN + len(header) + len(payload)
    return PREFIX.pack(length, len(header), FrameType.DATA, 0, 0, app_id, 17, 1) + header + payload


def relength(data: bytes, length: int) -> bytes:
    return struct.pack(">I", length) + data[4:]


header_values = st.one_of(st.none(), st.integers(-5, 2**40), st.text(max_size=8), st.binary(max_size=8))
headers_st = st.one_of(
    st.none(),
    st.just({}),
    st.dictionaries(st.sampled_from(["k", "topic", "n"]), header_values, min_size=1, max_size=3),
    st.dictionaries(st.text(max_size=4), st.lists(header_values, max_size=3), min_size=1, max_size=2),
)
payload_st = st.one_of(st.just(b""), st.just(b"boom!"), st.binary(max_size=200))
data_st = st.builds(
    lambda app, headers, payload: frame(FrameType.DATA, app, headers, payload),
    st.sampled_from([1, 2, 3]),  # 3 has no receiver
    headers_st,
    payload_st,
)
bad_st = st.one_of(
    st.builds(lambda d, delta: relength(d, len(d) + delta), data_st, st.sampled_from([-1, 1, 100])),
    st.just(with_header_bytes(1, b"\xc1\xc1")),  # not msgpack
    st.just(with_header_bytes(1, msgpack.packb([1, 2]))),  # msgpack, not a map
    st.just(with_header_bytes(1, msgpack.packb({1: 2}))),  # a key msgpack refuses by default
    st.just(with_header_bytes(1, msgpack.packb({"a": 1}) + b"\x00")),  # extra bytes
    st.just(relength(PREFIX.pack(16, 40, FrameType.DATA, 0, 0, 1, 17, 1), 16)),  # header_len too big
    st.just(frame(FrameType.DATA, 1, None, b"x" * MAX_FRAME)),  # over max_frame_size
    st.binary(max_size=15),  # shorter than a prefix
    st.binary(min_size=16, max_size=40),
)
control_st = st.one_of(
    st.just(frame(FrameType.PING, payload=b"\xc0")),
    st.just(frame(FrameType.PONG, payload=b"\xc0")),
    st.just(frame(FrameType.PONG)),
    st.just(frame(FrameType.PING, payload=b"\x01")),  # a heartbeat that is not nil or a map
    st.just(frame(FrameType.FRAG, payload=b"x")),  # reserved: ignored
    st.just(frame(9, payload=b"x")),  # unknown: ignored
    st.just(frame(FrameType.HELLO, payload=msgpack.packb({"endpoint_name": "site-2"}))),  # a second handshake
)
frame_st = st.one_of(data_st, data_st, data_st, control_st, bad_st)


def shaped(data: bytes, shape: str) -> Any:
    """The same frame as a driver might hand it over."""
    if shape == "bytearray":
        return bytearray(data)
    if shape == "memoryview":
        return memoryview(data)
    if shape == "slice":  # a view into a larger buffer (a gRPC batch)
        return memoryview(b"ab" + data + b"cd")[2 : 2 + len(data)]
    if shape == "list":
        return [data[:5], data[5:]]
    if shape == "signed":  # a view of another format: the general path's business
        return memoryview(data).cast("b")
    return data


shapes_st = st.sampled_from(["bytes", "bytes", "bytes", "bytearray", "memoryview", "slice", "list", "signed"])


def per_frame(rig: Rig, frames: list, inline: bool) -> None:
    """The oracle: what SfmFrameReceiver and the lanes did before, one call per frame."""
    for f in frames:
        if inline and rig.sfm_conn.closing:
            break
        rig.manager.process_frame_task(rig.sfm_conn, f)


@settings(max_examples=400)
@given(st.lists(st.tuples(frame_st, shapes_st), max_size=25), st.booleans())
def test_a_batch_is_handled_as_frame_by_frame(specs: list, inline: bool) -> None:
    batch_rig, oracle_rig = Rig(), Rig()
    batch_log = run_logged(
        lambda: batch_rig.manager.process_frames_task(
            batch_rig.sfm_conn, [shaped(d, s) for d, s in specs], inline=inline
        )
    )
    oracle_log = run_logged(lambda: per_frame(oracle_rig, [shaped(d, s) for d, s in specs], inline))
    assert batch_rig.outcome() == oracle_rig.outcome()
    assert batch_log == oracle_log


@settings(max_examples=100)
@given(st.lists(st.tuples(data_st, shapes_st), max_size=25), st.sampled_from([State.CLOSING, State.CLOSED]))
def test_a_batch_on_a_session_that_is_not_open_is_handled_as_frame_by_frame(specs: list, state: State) -> None:
    rigs = Rig(), Rig()
    for rig in rigs:
        if state is State.CLOSING:
            rig.sfm_conn.session.begin_close()  # our side closes: the peer's data still counts
        else:
            rig.sfm_conn.session.connection_lost()
    frames = [shaped(d, s) for d, s in specs]
    logs = (
        run_logged(lambda: rigs[0].manager.process_frames_task(rigs[0].sfm_conn, frames)),
        run_logged(lambda: per_frame(rigs[1], frames, inline=False)),
    )
    assert rigs[0].outcome() == rigs[1].outcome()
    assert logs[0] == logs[1]


def test_malformed_frame_mid_batch_delivers_what_came_before_and_closes_with_the_reason() -> None:
    rig = Rig()
    good = [frame(FrameType.DATA, 1, None, b"m%d" % i) for i in range(3)]
    bad = with_header_bytes(1, b"\xc1")
    records = run_logged(lambda: SfmFrameReceiver(rig.manager, rig.sfm_conn).process_frames([*good, bad, *good]))
    assert [d[-1][2] for d in rig.delivered] == [b"m0", b"m1", b"m2"]
    assert rig.conn.closed and rig.sfm_conn.session.state is State.CLOSED
    warnings = [m for level, m in records if level == "WARNING"]
    assert len(warnings) == 1 and "closing CN" in warnings[0] and "headers are not valid msgpack" in warnings[0]


def test_headers_and_payload_reach_the_receiver_as_the_general_path_gives_them() -> None:
    rig = Rig()
    headers = {"k": "v", "n": [1, 2], "b": b"\x00"}
    frames = [
        frame(FrameType.DATA, 1, headers, b"payload"),
        frame(FrameType.DATA, 2, None, b""),
        frame(FrameType.DATA, 1, {}, b"x"),
    ]
    rig.manager.process_frames_task(rig.sfm_conn, frames)
    assert rig.delivered == [
        ("site-1", rig.conn.name, 1, Message, headers, "v", (memoryview, True, b"payload")),
        ("site-1", rig.conn.name, 2, Message, None, None, None),
        ("site-1", rig.conn.name, 1, Message, None, None, (memoryview, True, b"x")),
    ]


def test_message_is_still_just_headers_and_payload() -> None:
    # The batch path builds a Message without calling __init__: it sets these two slots.
    # A new field in Message must be set there too.
    assert Message.__slots__ == ("headers", "payload")
    m = object.__new__(Message)
    m.headers, m.payload = {"k": 1}, None
    assert repr(m) == repr(Message({"k": 1}))


def test_a_subclass_that_overrides_process_frame_task_sees_every_frame() -> None:
    seen: list = []

    class Tapped(ConnManager):
        def process_frame_task(self, sfm_conn: SfmConnection, frame: Any) -> None:
            seen.append(bytes(frame))
            super().process_frame_task(sfm_conn, frame)

    rig = Rig(Tapped)
    frames = [frame(FrameType.DATA, 1, None, b"a"), frame(FrameType.PING, payload=b"\xc0")]
    SfmFrameReceiver(rig.manager, rig.sfm_conn).process_frames(frames)
    assert seen == frames
    assert len(rig.delivered) == 1 and len(rig.conn.sent) == 1  # the message, and a PONG


def test_a_receiver_registered_mid_batch_gets_the_frames_after_it() -> None:
    rig = Rig()
    got: list = []

    class Later(MessageReceiver):
        def process_message(self, endpoint: Endpoint, connection: Any, app_id: int, message: Message) -> None:
            got.append(bytes(message.payload))

    class Registering(MessageReceiver):
        def process_message(self, endpoint: Endpoint, connection: Any, app_id: int, message: Message) -> None:
            rig.manager.register_message_receiver(5, Later())

    rig.manager.register_message_receiver(4, Registering())
    frames = [frame(FrameType.DATA, a, None, p) for a, p in ((5, b"early"), (4, b"-"), (5, b"late"), (5, b"later"))]
    rig.manager.process_frames_task(rig.sfm_conn, frames)
    assert got == [b"late", b"later"]


def test_lane_batch_handler_skips_only_the_item_that_raised() -> None:
    done: list = []

    def batch(items: Any) -> None:
        for item in items:
            if item == b"bad":
                raise RuntimeError("handler bug")
            done.append(item)

    dispatcher = Dispatcher(workers=1)
    lane = dispatcher.lane(lambda item: None, batch_handler=batch)
    records = run_logged(lambda: (lane.submit([b"a", b"bad", b"b", b"bad", b"c"], 9), lane._run(256)))
    assert done == [b"a", b"b", b"c"]
    assert [m for level, m in records if level == "ERROR"] == ["delivery handler failed"] * 2
    assert not lane.busy and lane._bytes == 0


# -- FrameDecoder ------------------------------------------------------------------------


class OnePassDecoder(FrameDecoder):
    """The decoder's parse as it was before the two-pass version: the oracle."""

    def _parse(self) -> list:
        frames = []
        view, start, end = self._view, self._start, self._end
        unpack = struct.Struct(">IH").unpack_from
        own_buffer_above = min(self._large_frame, len(self._buf) // 2)
        while end - start >= PREFIX_LEN:
            length, header_len = unpack(view, start)
            limit = self.max_frame_size
            if self._first_frame_max is not None:
                limit = min(limit, self._first_frame_max)
                self._first_frame_max = None
            if length < PREFIX_LEN or length > limit or header_len > length - PREFIX_LEN:
                self._start, self._end = start, end
                check_prefix(length, header_len, limit)
            if end - start >= length:
                frames.append(bytes(view[start : start + length]))
                start += length
            elif length > own_buffer_above:
                have = end - start
                large = _frame_buffer(length)
                large[:have] = view[start:end]
                self._large, self._large_filled = large, have
                start = end = 0
                break
            else:
                break
        if start == end:
            start = end = 0
        self._start, self._end = start, end
        return frames


stream_frame_st = st.one_of(
    st.builds(lambda n, h: frame(FrameType.DATA, 1, h, b"x" * n), st.integers(0, 300), headers_st),
    st.builds(lambda n: frame(FrameType.DATA, 1, None, b"L" * n), st.integers(1000, 6000)),  # "large" here
    st.just(relength(frame(FrameType.DATA, 1, None, b"x"), 7)),  # below the prefix
    st.just(relength(frame(FrameType.DATA, 1, None, b"x"), 50_000)),  # over max_frame_size
    st.just(PREFIX.pack(20, 10, FrameType.DATA, 0, 0, 1, 17, 1) + b"\x00" * 4),  # header_len too big
)


def _feed_all(decoder: FrameDecoder, stream: bytes, cuts: list) -> list:
    """Every feed's result (frame types and bytes) or error, and the decoder's state after it."""
    out = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        try:
            got = decoder.feed(stream[prev:cut])
            result: Any = [(type(f), bytes(f)) for f in got]
        except CommError as e:
            out.append(("error", e.message, decoder.pending))
            break
        out.append((result, decoder.pending, decoder.in_large_frame))
        prev = cut
    return out


@settings(max_examples=400)
@given(st.lists(stream_frame_st, max_size=30), st.data(), st.sampled_from([None, 100, 2000]))
def test_the_decoder_cuts_and_refuses_as_the_one_pass_parse_did(frames: list, data: Any, first_max: Any) -> None:
    stream = b"".join(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    kw = dict(max_frame_size=20_000, buffer_size=8192, large_frame=2048, initial_size=512, first_frame_max=first_max)
    assert _feed_all(FrameDecoder(**kw), stream, cuts) == _feed_all(OnePassDecoder(**kw), stream, cuts)


def test_small_frames_come_out_as_bytes_of_their_own() -> None:
    # A payload a receiver keeps must hold its own frame, not the whole read.
    frames = [frame(FrameType.DATA, 1, None, b"%d" % i) for i in range(50)]
    out = FrameDecoder().feed(b"".join(frames))
    assert out == frames
    assert all(type(f) is bytes for f in out)


@pytest.mark.parametrize("inline", [True, False])
def test_frames_after_a_close_mid_batch(inline: bool) -> None:
    """An app that closes the connection from its receiver: inline delivery stops there,
    a lane goes on delivering what the closing side still accepts (as before)."""
    rigs = Rig(), Rig()
    for rig in rigs:
        rig.manager.receivers[1].process_message = lambda e, c, a, m, rig=rig: (  # type: ignore[method-assign]
            rig.delivered.append(bytes(m.payload)),
            rig.sfm_conn.close() if bytes(m.payload) == b"2" else None,
        )
    frames = [frame(FrameType.DATA, 1, None, b"%d" % i) for i in range(5)]
    rigs[0].manager.process_frames_task(rigs[0].sfm_conn, frames, inline=inline)
    per_frame(rigs[1], frames, inline)
    assert rigs[0].outcome() == rigs[1].outcome()
    assert rigs[0].delivered == ([b"0", b"1", b"2"] if inline else [b"0", b"1", b"2", b"3", b"4"])


# -- MessageFrames (ws, grpc) ------------------------------------------------------------


class OldMessageFrames(MessageFrames):
    """MessageFrames' checks as they were before the fast comparisons: the oracle."""

    def one(self, message: Any) -> Any:
        size = len(message)
        if size < PREFIX_LEN:
            raise self._short(size)
        length, header_len = struct.unpack_from(">IH", message)
        check_prefix(length, header_len, self._limit())
        if length != size:
            raise self._mismatch(length, size)
        return message

    def split(self, message: Any, batch: bool = False) -> list:
        size = len(message)
        if size < PREFIX_LEN:
            raise self._short(size)
        length, header_len = struct.unpack_from(">IH", message, 0)
        check_prefix(length, header_len, self._limit())
        if length == size:
            return [message]
        if length > size or not batch:
            raise self._mismatch(length, size)
        view = message if isinstance(message, memoryview) else memoryview(message)
        frames = [view[:length]]
        pos = length
        while pos < size:
            if size - pos < PREFIX_LEN:
                raise CommError(
                    CommError.BAD_DATA, f"batched {self.what} ends with {size - pos} bytes, not a whole frame"
                )
            length, header_len = struct.unpack_from(">IH", view, pos)
            check_prefix(length, header_len, self.max_frame_size)
            if pos + length > size:
                raise CommError(
                    CommError.BAD_DATA,
                    f"batched frame at offset {pos} says {length} bytes but only {size - pos} are left in {self.what}",
                )
            frames.append(view[pos : pos + length])
            pos += length
        return frames


def _checked(check: MessageFrames, messages: list, how: str) -> list:
    out = []
    for message in messages:
        try:
            got = check.one(message) if how == "one" else check.split(message, how == "batch")
            out.append([bytes(f) for f in got] if isinstance(got, list) else (got is message))
        except CommError as e:
            out.append(("error", e.code, e.message))
    return out


message_st = st.one_of(
    stream_frame_st,
    st.lists(stream_frame_st, min_size=2, max_size=5).map(b"".join),
    st.builds(lambda f, n: f[:n], stream_frame_st, st.integers(0, 40)),
    st.builds(lambda f, extra: f + extra, stream_frame_st, st.binary(min_size=1, max_size=20)),
)


@settings(max_examples=300)
@given(
    st.lists(message_st, max_size=8),
    st.sampled_from(["one", "split", "batch"]),
    st.sampled_from([None, 100, 2000]),
)
def test_message_frames_check_as_before(messages: list, how: str, first_max: Any) -> None:
    new = MessageFrames(20_000, what="Frame.data", first_frame_max=first_max)
    old = OldMessageFrames(20_000, what="Frame.data", first_frame_max=first_max)
    assert _checked(new, messages, how) == _checked(old, messages, how)
