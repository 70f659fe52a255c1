"""The sans-I/O Session: handshake, refusals, frame limits, numbering and timers, with a fake clock.

No sockets and no threads: frames are bytes handed from one session to the other by
:class:`Pair` (in the manner of h11's ``ConnectionPair``), which also plays the I/O shell's
part (accept on HelloReceived, send PINGs and PONGs, call ``heard()`` on every delivery).
The clock is a plain float.
"""

from __future__ import annotations

import itertools
import math
from collections import deque

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sfm_core.errors import CommError
from sfm_core.frames import MAX_FRAME_SIZE, PREFIX, PREFIX_LEN, Frame, FrameType, decode_frame, encode_frame
from sfm_core.handshake import build_handshake
from sfm_core.session import (
    CORE_EXTENSIONS,
    HEARTBEAT_PAYLOAD,
    Expired,
    HelloReceived,
    Ignored,
    Liveness,
    PingDue,
    ProtocolError,
    ReadyReceived,
    Refused,
    SendPong,
    Session,
    State,
)

# -- helpers ---------------------------------------------------------------------------------

NOW = 1000.0  # the fake monotonic clock at which sessions are created
TS = 1_700_000_000.25  # the wall-clock timestamp put in handshakes
LIVE = Liveness(interval=10.0, dead_after=3, handshake_timeout=5.0)  # dead_timeout 30 s
EVENT_TYPES = (Frame, HelloReceived, ReadyReceived, SendPong, PingDue, ProtocolError, Expired, Ignored)


def after(t: float) -> float:
    """The next float after ``t``: just past a bound."""
    return math.nextafter(t, math.inf)


def raw(ftype: int, payload: bytes | None = None, *, app_id: int = 0, stream_id: int = 1, headers=None) -> bytes:
    """One whole frame as bytes."""
    return b"".join(encode_frame(ftype, app_id, stream_id, headers, payload))


def hello(name: str = "site-1", props: dict | None = None, ext=("frame-limit",), limit: int | None = None) -> bytes:
    """A HELLO from a peer called ``name``, built by hand."""
    return raw(FrameType.HELLO, build_handshake(name, props, ext, TS, limit))


def ready(name: str = "server", props: dict | None = None, ext=("frame-limit",), limit: int | None = None) -> bytes:
    """A READY from a peer called ``name``, built by hand."""
    return raw(FrameType.READY, build_handshake(name, props, ext, TS, limit))


def hs_map(frame: bytes) -> dict:
    """The msgpack map of a HELLO/READY frame."""
    return msgpack.unpackb(decode_frame(frame).payload)


def prefix(frame) -> tuple:
    """(length, header_len, type, reserved, flags, app_id, stream_id, sequence) of a frame or buffer list."""
    head = frame if isinstance(frame, (bytes, bytearray)) else frame[0]
    return PREFIX.unpack_from(head)


def seq(frame) -> int:
    return prefix(frame)[7]


def passive(**kw) -> Session:
    kw.setdefault("liveness", LIVE)
    return Session("server", {"role": "srv"}, active=False, now=NOW, **kw)


def active(**kw) -> Session:
    kw.setdefault("liveness", LIVE)
    return Session("site-1", {"role": "client"}, active=True, now=NOW, **kw)


def make(state: str, **kw) -> Session:
    """A session (created at NOW) brought into the named state by the ordinary steps."""
    if state == "await_hello":
        return passive(**kw)
    if state == "accepting":
        s = passive(**kw)
        assert isinstance(s.receive(hello()), HelloReceived)
        return s
    if state == "await_ready":
        s = active(**kw)
        s.initiate(TS)
        return s
    if state == "open_passive":
        s = make("accepting", **kw)
        s.accept(TS)
        return s
    if state == "open_active":
        s = make("await_ready", **kw)
        assert isinstance(s.receive(ready()), ReadyReceived)
        return s
    if state == "closing":
        s = make("open_passive", **kw)
        s.begin_close()
        return s
    if state == "closed":
        s = make("open_passive", **kw)
        s.connection_lost()
        return s
    raise AssertionError(state)


ALL_STATES = ["await_hello", "accepting", "await_ready", "open_passive", "open_active", "closing", "closed"]
PRE_HANDSHAKE = ["await_hello", "accepting", "await_ready"]


class Pair:
    """Two sessions wired in memory, ``client`` (active) and ``server`` (passive); it plays the shell."""

    def __init__(
        self,
        *,
        now: float = NOW,
        liveness: Liveness = LIVE,
        client_ext=(),
        server_ext=(),
        client_max: int = MAX_FRAME_SIZE,
        server_max: int = MAX_FRAME_SIZE,
    ) -> None:
        self.now = now
        self.client = Session(
            "site-1", {"role": "client"}, active=True, now=now, max_frame_size=client_max,
            extensions=client_ext, liveness=liveness,
        )  # fmt: skip
        self.server = Session(
            "server", {"role": "srv"}, active=False, now=now, max_frame_size=server_max,
            extensions=server_ext, liveness=liveness,
        )  # fmt: skip
        self.wire: dict[Session, deque[bytes]] = {self.client: deque(), self.server: deque()}  # frames to each side
        self.received: dict[Session, list[Frame]] = {self.client: [], self.server: []}  # DATA each side got
        self.failures: dict[Session, list] = {self.client: [], self.server: []}  # ProtocolError / Expired
        self.events: dict[Session, list] = {self.client: [], self.server: []}  # everything, in order

    def other(self, session: Session) -> Session:
        return self.server if session is self.client else self.client

    def put(self, sender: Session, frame) -> None:
        """Put a frame (bytes, or the buffer list data_frame returns) on the wire toward the other side."""
        self.wire[self.other(sender)].append(frame if isinstance(frame, bytes) else b"".join(frame))

    def act(self, session: Session, event):
        """Do what the shell does with an event of ``session``; return the event."""
        self.events[session].append(event)
        if isinstance(event, Frame):
            self.received[session].append(event)
        elif isinstance(event, HelloReceived):
            self.put(session, session.accept(TS))
        elif isinstance(event, (SendPong, PingDue)):
            self.put(session, event.frame)
        elif isinstance(event, (ProtocolError, Expired)):
            self.failures[session].append(event)
        return event

    def deliver(self, to: Session, count: int | None = None) -> list:
        """Deliver up to ``count`` waiting frames (all by default) to ``to``, in order; return its events."""
        wire = self.wire[to]
        n = len(wire) if count is None else min(count, len(wire))
        events = []
        for _ in range(n):
            frame = wire.popleft()
            to.heard(self.now)  # bytes arrived
            events.append(self.act(to, to.receive(frame)))
        return events

    def flush(self) -> None:
        """Deliver everything both ways until the wire is empty (PONGs to delivered PINGs included)."""
        while self.wire[self.client] or self.wire[self.server]:
            self.deliver(self.server)
            self.deliver(self.client)

    def tick(self, session: Session):
        return self.act(session, session.tick(self.now))

    def handshake(self) -> Pair:
        self.put(self.client, self.client.initiate(TS))
        self.flush()
        assert self.client.state is State.OPEN and self.server.state is State.OPEN
        return self


# -- the handshake -----------------------------------------------------------------------------


def test_handshake_step_by_step() -> None:
    """HELLO then READY open both sides; each learns the other's name and properties; states follow the table."""
    client, server = active(), passive()
    assert (client.state, server.state) == (State.AWAIT_READY, State.AWAIT_HELLO)
    assert client.peer is None and server.peer is None

    hello_frame = client.initiate(TS)
    assert client.state is State.AWAIT_READY
    length, header_len, ftype, reserved, flags, app_id, stream_id, sequence = prefix(hello_frame)
    assert (length, header_len, ftype, reserved, flags, app_id, stream_id, sequence) == (
        len(hello_frame), 0, FrameType.HELLO, 0, 0, 0, 1, 1
    )  # fmt: skip

    event = server.receive(hello_frame)
    assert isinstance(event, HelloReceived) and server.state is State.ACCEPTING
    assert event.peer is server.peer and event.peer.name == "site-1"
    assert event.peer.properties == {"role": "client", "timestamp": TS}

    ready_frame = server.accept(TS)
    assert server.state is State.OPEN
    assert prefix(ready_frame)[2:] == (FrameType.READY, 0, 0, 0, 1, 1)

    event = client.receive(ready_frame)
    assert isinstance(event, ReadyReceived) and client.state is State.OPEN
    assert event.peer.name == "server" and event.peer.properties == {"role": "srv", "timestamp": TS}
    assert client.extensions == server.extensions == {"frame-limit", "refusal"}
    assert client.driver_extensions == server.driver_extensions == frozenset()


def test_protocol_keys_are_not_peer_properties() -> None:
    """endpoint_name, sfm_ext and sfm_max_frame_size are taken out of the map; timestamp stays in properties."""
    server = passive()
    event = server.receive(hello(props={"a": 1}, ext=("frame-limit", "zip"), limit=4096))
    assert event.peer.properties == {"a": 1, "timestamp": TS}
    assert event.peer.extensions == {"frame-limit", "zip"} and event.peer.max_frame_size == 4096


def test_extensions_are_those_both_offered() -> None:
    """Each side lists what it offers; READY lists only the common ones; both end up agreeing."""
    pair = Pair(client_ext=("grpc-batch", "zip"), server_ext=("grpc-batch", "other"))
    hello_frame = pair.client.initiate(TS)
    assert hs_map(hello_frame)["sfm_ext"] == ["frame-limit", "grpc-batch", "refusal", "zip"]  # sorted, all offered
    assert hs_map(hello_frame)["sfm_max_frame_size"] == MAX_FRAME_SIZE
    pair.put(pair.client, hello_frame)
    pair.deliver(pair.server)
    ready_frame = pair.wire[pair.client][0]
    assert hs_map(ready_frame)["sfm_ext"] == ["frame-limit", "grpc-batch", "refusal"]  # only the common ones
    pair.flush()
    assert pair.client.extensions == pair.server.extensions == {"frame-limit", "grpc-batch", "refusal"}
    assert pair.client.driver_extensions == pair.server.driver_extensions == {"grpc-batch"}


def test_ready_to_a_plain_peer_is_the_original_map() -> None:
    """To a HELLO without sfm_ext, READY is exactly {endpoint_name, timestamp}: no sfm_ext, no sfm_max_frame_size."""
    server = Session("server", None, active=False, now=NOW, extensions=("grpc-batch",), liveness=LIVE)
    server.receive(hello(ext=()))
    ready_frame = server.accept(TS)
    payload = bytes(decode_frame(ready_frame).payload)
    assert payload == msgpack.packb({"endpoint_name": "server", "timestamp": TS})
    assert server.extensions == frozenset() and server.driver_extensions == frozenset()


def test_ready_to_a_plain_peer_has_no_extension_keys_with_properties() -> None:
    """With properties too, a READY to a plain peer holds no sfm_ext and no sfm_max_frame_size, not even as bytes."""
    server = passive(extensions=("grpc-batch",), max_frame_size=4096)
    server.receive(hello(ext=()))
    ready_frame = server.accept(TS)
    assert b"sfm_ext" not in ready_frame and b"sfm_max_frame_size" not in ready_frame
    assert hs_map(ready_frame) == {"endpoint_name": "server", "timestamp": TS, "role": "srv"}


def test_ready_to_a_plain_peer_is_nvflares_bytes_with_properties() -> None:
    """With properties, READY to a plain peer is NVFlare's map byte for byte: endpoint_name, timestamp, properties."""
    server = passive()
    server.receive(hello(ext=()))
    payload = bytes(decode_frame(server.accept(TS)).payload)
    assert payload == msgpack.packb({"endpoint_name": "server", "timestamp": TS, "role": "srv"})


def test_ready_lists_no_extension_keys_but_the_agreed_ones() -> None:
    """A peer offering grpc-batch but not frame-limit gets sfm_ext ["grpc-batch"] and no sfm_max_frame_size."""
    server = passive(extensions=("grpc-batch",))
    server.receive(hello(ext=("grpc-batch",)))
    ready_map = hs_map(server.accept(TS))
    assert ready_map["sfm_ext"] == ["grpc-batch"] and "sfm_max_frame_size" not in ready_map
    assert server.extensions == {"grpc-batch"}


def test_active_side_with_a_plain_ready() -> None:
    """A READY without sfm_ext means no extensions for the active side, and its own send limit."""
    client = active(extensions=("grpc-batch",), max_frame_size=5000)
    client.initiate(TS)
    event = client.receive(ready(ext=()))
    assert isinstance(event, ReadyReceived) and client.state is State.OPEN
    assert client.extensions == frozenset() and client.send_limit == 5000


def test_handshake_calls_out_of_turn_raise() -> None:
    """initiate() only on a fresh active side, accept() only in ACCEPTING: otherwise CommError."""
    with pytest.raises(CommError):
        passive().initiate(TS)
    with pytest.raises(CommError):
        make("open_active").initiate(TS)
    with pytest.raises(CommError):
        passive().accept(TS)
    with pytest.raises(CommError):
        make("open_passive").accept(TS)


def test_refuse_closes() -> None:
    """refuse(reason) after HelloReceived: CLOSED with that reason; nothing more is sent or received."""
    server = make("accepting")
    server.refuse("not on the list")
    assert server.state is State.CLOSED and server.close_reason == "not on the list"
    with pytest.raises(CommError):
        server.accept(TS)
    assert isinstance(server.receive(raw(FrameType.DATA, b"x", app_id=1)), Ignored)


# -- refusals ----------------------------------------------------------------------------------

_no_name = raw(FrameType.HELLO, msgpack.packb({"timestamp": TS}))
_bad_prefix = PREFIX.pack(20, 5, FrameType.DATA, 0, 0, 1, 17, 1) + b"abcd"
_short_length = PREFIX.pack(10, 0, FrameType.PING, 0, 0, 0, 1, 1)
_not_map_headers = PREFIX.pack(16 + 3, 3, FrameType.DATA, 0, 0, 1, 17, 1) + msgpack.packb([1, 2])

REFUSALS = [
    ("await_hello", _no_name, "no endpoint_name"),
    ("await_hello", hello(name="server"), "our own endpoint name"),
    ("await_hello", hello(name="a..b"), "invalid endpoint name 'a..b'"),
    ("await_hello", hello(name="x y"), "invalid endpoint name 'x y'"),
    ("await_hello", hello(name="a.a"), "repeated"),
    ("await_hello", raw(FrameType.HELLO, msgpack.packb({"endpoint_name": 7})), "no endpoint_name"),
    ("await_ready", ready(name="site-1"), "our own endpoint name"),
    ("await_ready", ready(name="a..b"), "invalid endpoint name"),
    ("accepting", hello(name="other"), "second handshake frame (HELLO)"),
    ("open_passive", hello(name="other"), "second handshake frame (HELLO)"),
    ("open_active", ready(name="other"), "second handshake frame (READY)"),
    ("await_hello", ready(), "got READY where HELLO was expected"),
    ("await_ready", hello(name="server"), "got HELLO where READY was expected"),
    ("await_hello", raw(FrameType.DATA, b"x", app_id=1), "DATA frame before the handshake"),
    ("accepting", raw(FrameType.DATA, b"x", app_id=1), "DATA frame before the handshake"),
    ("await_ready", raw(FrameType.DATA, b"x", app_id=1), "DATA frame before the handshake"),
    ("await_hello", raw(FrameType.HELLO, b"\xc1"), "not valid msgpack"),
    ("await_hello", raw(FrameType.HELLO, b"\x82\xa1a"), "not valid msgpack"),
    ("await_hello", raw(FrameType.HELLO, msgpack.packb(["endpoint_name", "site-1"])), "must be a map, got list"),
    ("await_ready", raw(FrameType.READY, msgpack.packb("server")), "must be a map, got str"),
    ("await_hello", raw(FrameType.HELLO), "handshake has no payload"),
    ("await_hello", b"", "shorter than the 16-byte prefix"),
    ("open_passive", b"\x00" * 15, "frame of 15 bytes is shorter than the 16-byte prefix"),
    ("open_passive", raw(FrameType.DATA, b"x", app_id=1) + b"y", "length field says 17 bytes but the frame has 18"),
    ("open_passive", raw(FrameType.DATA, b"xy", app_id=1)[:-1], "length field says 18 bytes but the frame has 17"),
    ("open_passive", _bad_prefix, "header_len 5 exceeds the 4 bytes after the prefix"),
    ("open_passive", _short_length, "frame length 10 is below the 16-byte prefix"),
    ("open_passive", _not_map_headers, "headers must be a msgpack map"),
    ("open_passive", raw(FrameType.PING, msgpack.packb(5)), "heartbeat payload must be nil or a map, got int"),
    ("open_passive", raw(FrameType.PING, msgpack.packb([1])), "heartbeat payload must be nil or a map, got list"),
    ("open_active", raw(FrameType.PONG, msgpack.packb("x")), "heartbeat payload must be nil or a map, got str"),
    ("open_active", raw(FrameType.PING, b"\xc0\xc0"), "heartbeat payload is not valid msgpack"),
    ("await_hello", raw(FrameType.PING, b"\xc1"), "heartbeat payload is not valid msgpack"),
    ("closing", raw(FrameType.PONG, msgpack.packb(True)), "heartbeat payload must be nil or a map, got bool"),
]


@pytest.mark.parametrize(("state", "frame", "reason"), REFUSALS)
def test_refusal_is_a_protocol_error_and_closes(state: str, frame: bytes, reason: str) -> None:
    """Every breach of the protocol: a ProtocolError naming the problem, and the session CLOSED for good."""
    session = make(state)
    event = session.receive(frame)
    assert isinstance(event, ProtocolError), event
    assert reason in event.reason
    assert session.state is State.CLOSED and session.close_reason == event.reason
    with pytest.raises(CommError) as err:
        session.data_frame(1, 17, None, b"x")
    assert err.value.code == CommError.CLOSED
    assert isinstance(session.receive(raw(FrameType.PING, HEARTBEAT_PAYLOAD)), Ignored)  # no PONG once closed
    assert session.tick(NOW + 1e6) is None


def test_frame_over_our_max_frame_size_is_refused() -> None:
    """A received frame longer than our max_frame_size closes the session, naming the limit."""
    session = make("open_passive", max_frame_size=200)
    assert isinstance(session.receive(raw(FrameType.DATA, b"x" * 184, app_id=1)), Frame)  # exactly 200
    event = session.receive(raw(FrameType.DATA, b"x" * 185, app_id=1))
    assert isinstance(event, ProtocolError)
    assert "frame length 201 exceeds the maximum frame size of 200" in event.reason
    assert session.state is State.CLOSED


@pytest.mark.parametrize("limit", [15, -1, 0, 1.5, "big", True, [100]])
@pytest.mark.parametrize("side", ["await_hello", "await_ready"])
def test_invalid_sfm_max_frame_size_is_refused(side: str, limit: object) -> None:
    """A handshake whose sfm_max_frame_size is not an int >= 16 is a ProtocolError."""
    session = make(side)
    name, ftype = ("site-1", FrameType.HELLO) if side == "await_hello" else ("server", FrameType.READY)
    body = {"endpoint_name": name, "timestamp": TS, "sfm_ext": ["frame-limit"], "sfm_max_frame_size": limit}
    event = session.receive(raw(ftype, msgpack.packb(body)))
    assert isinstance(event, ProtocolError) and "sfm_max_frame_size must be an integer >= 16" in event.reason
    assert session.state is State.CLOSED


@pytest.mark.parametrize("ftype", [FrameType.FRAG, FrameType.ACK, 0, 8, 200, 255])
@pytest.mark.parametrize("state", ["await_hello", "accepting", "await_ready", "open_passive", "open_active", "closing"])
def test_reserved_and_unknown_types_are_ignored(state: str, ftype: int) -> None:
    """FRAG, ACK and unknown frame types are Ignored, not errors; the state does not change."""
    session = make(state)
    before = session.state
    event = session.receive(raw(ftype, b"anything", app_id=3))
    assert isinstance(event, Ignored) and event.reason
    assert session.state is before


@pytest.mark.parametrize("ftype", [FrameType.DATA, FrameType.HELLO, FrameType.READY, FrameType.PING, FrameType.FRAG])
def test_frames_after_close_are_ignored(ftype: int) -> None:
    """Once CLOSED, well-formed frames of any type are Ignored: no PONG, no data, no reopening."""
    session = make("closed")
    assert isinstance(session.receive(raw(ftype, HEARTBEAT_PAYLOAD, app_id=1)), Ignored)
    assert session.state is State.CLOSED and session.close_reason == "the transport closed"


@pytest.mark.parametrize("payload", [None, HEARTBEAT_PAYLOAD, msgpack.packb({}), msgpack.packb({"a": 1})])
@pytest.mark.parametrize("state", [*PRE_HANDSHAKE, "open_passive", "closing"])
def test_ping_in_any_state_but_closed_is_answered(state: str, payload: bytes | None) -> None:
    """A PING (nil, a map or no payload), before the handshake too, is answered with a 17-byte PONG of nil."""
    session = make(state)
    before = session.state
    event = session.receive(raw(FrameType.PING, payload))
    assert isinstance(event, SendPong) and session.state is before
    pong = decode_frame(event.frame)
    assert (pong.type, pong.app_id, pong.headers, bytes(pong.payload)) == (FrameType.PONG, 0, None, b"\xc0")
    assert len(event.frame) == 17


@pytest.mark.parametrize("payload", [None, HEARTBEAT_PAYLOAD, msgpack.packb({"a": 1})])
@pytest.mark.parametrize("state", [*PRE_HANDSHAKE, "open_active", "closing"])
def test_pong_is_accepted_quietly(state: str, payload: bytes | None) -> None:
    """A PONG returns None and is counted, in any state but CLOSED."""
    session = make(state)
    before = session.state
    assert session.receive(raw(FrameType.PONG, payload)) is None
    assert session.pongs_received == 1 and session.state is before


# -- sending DATA and frame limits --------------------------------------------------------------


def test_data_frame_layout_and_no_copy() -> None:
    """data_frame gives [prefix + headers, *payload buffers]; the payload objects are not copied."""
    pair = Pair().handshake()
    payload = b"hello"
    bufs = pair.client.data_frame(7, 17, {"k": "v"}, payload)
    hb = msgpack.packb({"k": "v"})
    assert bufs[1] is payload and len(bufs) == 2
    assert prefix(bufs) == (16 + len(hb) + 5, len(hb), FrameType.DATA, 0, 0, 7, 17, 2)
    assert bufs[0][PREFIX_LEN:] == hb
    parts = [b"ab", bytearray(b"cd"), memoryview(b"ef")]
    assert pair.client.data_frame(1, 18, None, parts)[1:] == parts
    pair.put(pair.client, bufs)
    pair.put(pair.client, pair.client.data_frame(1, 18, None, parts))
    pair.flush()
    first, second = pair.received[pair.server]
    assert (first.app_id, first.stream_id, first.headers, bytes(first.payload)) == (7, 17, {"k": "v"}, b"hello")
    assert (second.headers, bytes(second.payload)) == (None, b"abcdef")


@pytest.mark.parametrize("payload", [None, b"", bytearray(), memoryview(b""), []])
def test_empty_payload_and_headers_arrive_as_none(payload) -> None:
    """An empty payload and empty headers go out as a bare prefix and arrive as None."""
    pair = Pair().handshake()
    bufs = pair.server.data_frame(5, 17, {}, payload)
    assert b"".join(bufs) == PREFIX.pack(16, 0, FrameType.DATA, 0, 0, 5, 17, 2)
    pair.put(pair.server, bufs)
    pair.flush()
    (frame,) = pair.received[pair.client]
    assert frame.headers is None and frame.payload is None


def test_data_frame_refuses_unencodable_headers_before_numbering() -> None:
    """Headers msgpack cannot encode: CommError BAD_DATA, and no sequence number is used up."""
    pair = Pair().handshake()
    with pytest.raises(CommError) as err:
        pair.client.data_frame(1, 17, {"x": object()}, b"p")
    assert err.value.code == CommError.BAD_DATA
    assert seq(pair.client.data_frame(1, 17, None, b"p")) == 2


def test_data_frame_refuses_headers_that_are_not_a_map() -> None:
    """Headers that are not a map would make the peer close the connection: refused with BAD_DATA up front."""
    pair = Pair().handshake()
    with pytest.raises(CommError) as err:
        pair.client.data_frame(1, 17, ["not", "a", "map"], b"p")  # type: ignore[arg-type]
    assert err.value.code == CommError.BAD_DATA


@pytest.mark.parametrize(("state", "code"), [("accepting", CommError.NOT_READY), ("closing", CommError.CLOSED),
                                             ("closed", CommError.CLOSED)])  # fmt: skip
def test_data_frame_only_when_open(state: str, code: str) -> None:
    """data_frame outside OPEN raises: NOT_READY while accepting, CLOSED when closing or closed."""
    with pytest.raises(CommError) as err:
        make(state).data_frame(1, 17, None, b"x")
    assert err.value.code == code


@pytest.mark.parametrize("state", ["await_hello", "await_ready"])
def test_data_frame_before_the_handshake_raises(state: str) -> None:
    """No DATA can be encoded before the handshake."""
    with pytest.raises(CommError):
        make(state).data_frame(1, 17, None, b"x")


def test_send_limit_is_the_peers_announced_smaller_limit() -> None:
    """With frame-limit agreed, a frame over the peer's smaller limit is refused before anything, naming both limits."""
    pair = Pair(server_max=1000).handshake()
    assert pair.client.extensions == {"frame-limit", "refusal"}
    assert pair.client.send_limit == 1000 and pair.server.send_limit == 1000
    assert seq(pair.client.data_frame(1, 17, None, b"x" * (1000 - 16))) == 2  # exactly the limit: fine
    with pytest.raises(CommError) as err:
        pair.client.data_frame(1, 18, {"h": 1}, b"x" * (1000 - 16))
    assert err.value.code == CommError.BAD_DATA
    assert "frame length 1004" in err.value.message
    assert "1000" in err.value.message and str(MAX_FRAME_SIZE) in err.value.message  # the peer's and ours
    assert not pair.wire[pair.server]  # nothing went out
    assert seq(pair.client.data_frame(1, 18, None, b"x")) == 3  # the refused frame used no sequence number
    assert pair.client.state is State.OPEN


def test_send_limit_is_ours_when_ours_is_smaller() -> None:
    """Our own max_frame_size also bounds what we send, whatever the peer announced."""
    pair = Pair(client_max=500, server_max=1000).handshake()
    assert pair.client.send_limit == 500 and pair.server.send_limit == 500
    with pytest.raises(CommError) as err:
        pair.client.data_frame(1, 17, None, b"x" * 485)
    assert err.value.code == CommError.BAD_DATA and "maximum frame size of 500" in err.value.message


def test_frame_over_both_limits_is_refused() -> None:
    """A frame over our limit and the peer's is refused with BAD_DATA, nothing sent."""
    pair = Pair(client_max=2000, server_max=1000).handshake()
    with pytest.raises(CommError) as err:
        pair.client.data_frame(1, 17, None, b"x" * 3000)
    assert err.value.code == CommError.BAD_DATA and "2000" in err.value.message


def test_send_limit_without_frame_limit_on_the_peer_is_ours() -> None:
    """A peer that did not list frame-limit is taken at the original limit: our own max_frame_size bounds sends."""
    server = passive(max_frame_size=1000)
    event = server.receive(raw(FrameType.HELLO, build_handshake("site-1", {}, (), TS, 100)))  # no extensions
    assert event.peer.max_frame_size is None
    server.accept(TS)
    assert server.extensions == frozenset() and server.send_limit == 1000
    server.data_frame(1, 17, None, b"x" * (1000 - 16))
    with pytest.raises(CommError) as err:
        server.data_frame(1, 17, None, b"x" * (1001 - 16))
    assert err.value.code == CommError.BAD_DATA and "1000" in err.value.message


def test_announced_limit_without_frame_limit_listed_is_not_used() -> None:
    """An sfm_max_frame_size in a map that does not list frame-limit is not a send limit (and not a property)."""
    server = passive(max_frame_size=1000)
    body = {"endpoint_name": "site-1", "timestamp": TS, "sfm_max_frame_size": 100}
    event = server.receive(raw(FrameType.HELLO, msgpack.packb(body)))
    server.accept(TS)
    assert server.send_limit == 1000 and event.peer.properties == {"timestamp": TS}


def test_hand_built_hello_with_frame_limit_sets_the_limit() -> None:
    """A HELLO listing frame-limit with sfm_max_frame_size 100 makes 100 the passive side's send limit."""
    server = passive(max_frame_size=1000)
    server.receive(hello(limit=100))
    server.accept(TS)
    assert server.send_limit == 100
    with pytest.raises(CommError):
        server.data_frame(1, 17, None, b"x" * 85)


# -- sequence numbers and stream ids ----------------------------------------------------------


def test_sequence_numbers_count_every_frame_sent() -> None:
    """Sequence starts at 1 (HELLO/READY) and goes up by one per frame sent, data and control alike."""
    pair = Pair().handshake()
    sent = [pair.client.data_frame(1, 17, None, b"a"), pair.client.data_frame(1, 18, {"h": 1}, None)]
    pair.now = NOW + LIVE.interval
    ping = pair.client.tick(pair.now)
    assert isinstance(ping, PingDue)
    pong = pair.server.receive(ping.frame)
    assert isinstance(pong, SendPong)
    sent.append(pair.client.data_frame(1, 19, None, b"c"))
    assert [seq(f) for f in sent[:2]] + [seq(ping.frame), seq(sent[2])] == [2, 3, 4, 5]
    assert seq(pong.frame) == 2  # the server sent READY (1), then this PONG
    assert seq(pair.server.data_frame(1, 17, None, b"z")) == 3


def test_sequence_wraps_after_0xffff_to_0() -> None:
    """After 0xFFFF comes 0, then 1: (seq + 1) & 0xFFFF."""
    pair = Pair().handshake()  # HELLO was 1
    seqs = [seq(pair.client.data_frame(1, 17, None, None)) for _ in range(0xFFFF + 2)]
    assert seqs[0] == 2 and seqs[0xFFFF - 2] == 0xFFFF and seqs[0xFFFF - 1] == 0 and seqs[0xFFFF] == 1
    assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(seqs))


def test_ping_pong_stream_ids_are_1_until_set() -> None:
    """PING and PONG carry stream id 1 until the shell sets session.stream_ids; then they take from it, & 0xFFFF."""
    pair = Pair().handshake()
    assert prefix(pair.client.tick(NOW + LIVE.interval).frame)[6] == 1
    assert prefix(pair.server.receive(raw(FrameType.PING, HEARTBEAT_PAYLOAD)).frame)[6] == 1
    pair.client.stream_ids = itertools.count(17)
    pair.server.stream_ids = iter([0xFFFF, 0x10000])
    assert prefix(pair.client.tick(NOW + 2 * LIVE.interval).frame)[6] == 17
    assert prefix(pair.client.receive(raw(FrameType.PING, None)).frame)[6] == 18
    assert prefix(pair.server.receive(raw(FrameType.PING, None)).frame)[6] == 0xFFFF
    assert prefix(pair.server.receive(raw(FrameType.PING, None)).frame)[6] == 0


def test_handshake_stream_id_is_always_1() -> None:
    """HELLO and READY carry stream id 1 even when stream_ids was set before (as the shell does before accept)."""
    server = make("accepting")
    server.stream_ids = itertools.count(17)
    assert prefix(server.accept(TS))[6] == 1
    client = active()
    client.stream_ids = itertools.count(17)
    assert prefix(client.initiate(TS))[6] == 1


# -- liveness ----------------------------------------------------------------------------------


def test_liveness_settings() -> None:
    """dead_timeout is interval x dead_after; interval or handshake_timeout <= 0, or dead_after < 1, is BAD_CONFIG."""
    assert Liveness(2.0, 4, 1.0).dead_timeout == 8.0
    for args in [(0, 3, 10), (-1, 3, 10), (1, 0.5, 10), (1, 3, 0)]:
        with pytest.raises(CommError) as err:
            Liveness(*args)
        assert err.value.code == CommError.BAD_CONFIG


def test_ping_every_interval_whatever_the_traffic() -> None:
    """A PING falls due every interval after the last one, however often heard() is called."""
    pair = Pair().handshake()
    client = pair.client
    pings = []
    for i in range(201):  # 100 s in steps of 0.5 s, the peer heard at every step
        now = NOW + i * 0.5
        client.heard(now)
        event = client.tick(now)
        if isinstance(event, PingDue):
            pings.append(now)
            assert decode_frame(event.frame).type == FrameType.PING
        else:
            assert event is None
    assert pings == [NOW + 10.0 * k for k in range(1, 11)]
    assert client.pings_sent == 10 and client.state is State.OPEN


def test_ping_not_before_its_time() -> None:
    """Just before the interval no PING; at it, one; a late tick schedules the next one interval after itself."""
    client = Pair().handshake().client
    assert client.tick(math.nextafter(NOW + 10.0, 0)) is None
    assert isinstance(client.tick(NOW + 10.0), PingDue)
    assert client.tick(NOW + 10.0) is None  # one PING per interval
    assert isinstance(client.tick(NOW + 25.0), PingDue)  # late: the next is due at 35
    client.heard(NOW + 25.0)
    assert client.tick(NOW + 34.9) is None
    assert isinstance(client.tick(NOW + 35.0), PingDue)


@pytest.mark.parametrize("keep_alive", ["heard", "progressed"])
def test_no_expiry_while_heard_or_progressing(keep_alive: str) -> None:
    """Never Expired while heard() or progressed() comes within dead_timeout, however long (a slow stream)."""
    pair = Pair().handshake()
    session = pair.server
    step = LIVE.dead_timeout - 0.5
    for i in range(1, 400):
        now = NOW + i * step
        assert not isinstance(session.tick(now), Expired)
        getattr(session, keep_alive)(now)
    assert session.state is State.OPEN


def test_expired_exactly_after_dead_timeout() -> None:
    """With nothing heard and no progress, Expired just after dead_timeout past the later of the two, not at it."""
    pair = Pair().handshake()
    client = pair.client
    client.heard(NOW + 4.0)
    client.progressed(NOW + 7.0)
    bound = NOW + 7.0 + LIVE.dead_timeout
    assert not isinstance(client.tick(bound), Expired) and client.state is State.OPEN
    event = client.tick(after(bound))
    assert isinstance(event, Expired) and "nothing heard from the peer and no send progress" in event.reason
    assert client.state is State.CLOSED and client.close_reason == event.reason
    assert client.tick(bound + 100) is None


def test_expired_counts_from_the_last_heard_when_later() -> None:
    """heard() later than progressed() moves the dead bound to heard + dead_timeout."""
    client = Pair().handshake().client
    client.progressed(NOW + 2.0)
    client.heard(NOW + 6.0)
    assert not isinstance(client.tick(NOW + 36.0), Expired)
    assert isinstance(client.tick(after(NOW + 36.0)), Expired)


@pytest.mark.parametrize("state", PRE_HANDSHAKE)
def test_handshake_timeout(state: str) -> None:
    """In AWAIT_HELLO, ACCEPTING and AWAIT_READY: Expired just after handshake_timeout since creation, heard or not."""
    session = make(state)
    session.heard(NOW + 5.0)  # traffic does not stand in for a handshake
    assert session.tick(NOW + 5.0) is None
    event = session.tick(after(NOW + 5.0))
    assert isinstance(event, Expired) and event.reason == "no handshake within 5.0 s"
    assert session.state is State.CLOSED and session.close_reason == event.reason
    assert session.tick(NOW + 100) is None


@pytest.mark.parametrize("state", PRE_HANDSHAKE)
def test_no_ping_before_the_handshake(state: str) -> None:
    """No PING is due before the handshake, even past the interval (handshake_timeout longer than interval)."""
    session = make(state, liveness=Liveness(interval=1.0, dead_after=3, handshake_timeout=5.0))
    for i in range(11):
        assert session.tick(NOW + i * 0.5) is None


@pytest.mark.parametrize("close", ["connection_lost", "expired", "protocol_error", "refuse"])
def test_no_timers_after_closed(close: str) -> None:
    """Once CLOSED, however it closed, tick() returns None forever (no PING, no second Expired)."""
    session = make("accepting" if close == "refuse" else "open_passive")
    if close == "connection_lost":
        session.connection_lost("gone")
        assert session.close_reason == "gone"
    elif close == "expired":
        assert isinstance(session.tick(NOW + 100.0), Expired)
    elif close == "protocol_error":
        assert isinstance(session.receive(b"junk"), ProtocolError)
    else:
        session.refuse("no")
    assert session.state is State.CLOSED
    for t in (NOW + 10.0, NOW + 30.5, NOW + 1e6):
        assert session.tick(t) is None
    assert session.pings_sent == 0


def test_begin_close_refuses_sends_but_delivers_received_data() -> None:
    """CLOSING: data_frame raises CLOSED; received DATA still comes out; PINGs are answered; the dead timer runs."""
    pair = Pair().handshake()
    pair.server.begin_close()
    assert pair.server.state is State.CLOSING
    with pytest.raises(CommError) as err:
        pair.server.data_frame(1, 17, None, b"x")
    assert err.value.code == CommError.CLOSED
    pair.put(pair.client, pair.client.data_frame(9, 17, {"k": 1}, b"late"))
    pair.flush()
    (frame,) = pair.received[pair.server]
    assert (frame.app_id, frame.headers, bytes(frame.payload)) == (9, {"k": 1}, b"late")
    assert isinstance(pair.server.receive(raw(FrameType.PING, HEARTBEAT_PAYLOAD)), SendPong)
    pair.server.begin_close()  # again: still CLOSING
    assert pair.server.state is State.CLOSING
    assert isinstance(pair.server.tick(after(NOW + LIVE.dead_timeout)), Expired)  # a drain to a dead peer ends
    pair.server.begin_close()  # CLOSED stays CLOSED
    assert pair.server.state is State.CLOSED


@pytest.mark.parametrize("state", ["await_hello", "await_ready"])
def test_begin_close_before_the_handshake_closes(state: str) -> None:
    """begin_close() before the handshake: nothing to drain, so CLOSED: no PING, no timer, a late handshake ignored."""
    session = make(state, liveness=Liveness(interval=1.0, dead_after=3, handshake_timeout=5.0))
    session.begin_close()
    assert session.state is State.CLOSED and "before the handshake" in session.close_reason
    assert session.tick(NOW + 1.0) is None  # no PING before READY went out
    assert session.tick(after(NOW + 5.0)) is None
    late = hello() if state == "await_hello" else ready()
    assert isinstance(session.receive(late), Ignored)


def test_pair_stays_alive_with_regular_ticks() -> None:
    """Two sides ticking every 3 s and delivering what they send stay OPEN for an hour, PINGs and PONGs flowing."""
    pair = Pair().handshake()
    for i in range(1, 1200):
        pair.now = NOW + i * 3.0
        pair.tick(pair.client)
        pair.tick(pair.server)
        pair.flush()
    assert not pair.failures[pair.client] and not pair.failures[pair.server]
    assert pair.client.pings_sent == pair.client.pongs_received > 250
    assert pair.server.pings_sent == pair.server.pongs_received > 250


def test_silent_peer_expires() -> None:
    """When nothing is delivered for longer than dead_timeout, both sides expire on their next tick."""
    pair = Pair().handshake()
    pair.now = after(NOW + LIVE.dead_timeout)
    assert isinstance(pair.tick(pair.client), Expired)
    assert isinstance(pair.tick(pair.server), Expired)


# -- property tests ------------------------------------------------------------------------------

msgpack_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(allow_nan=False),
        st.text(max_size=10),
        st.binary(max_size=10),
    ),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)
headers_st = st.dictionaries(st.text(max_size=8), msgpack_values, max_size=4)

handshake_maps = st.fixed_dictionaries(
    {"endpoint_name": st.sampled_from(["site-1", "server", "peer", "a..b", "", 3])},
    optional={
        "timestamp": st.floats(allow_nan=False),
        "sfm_ext": st.one_of(st.lists(st.sampled_from(["frame-limit", "grpc-batch", 1]), max_size=3), msgpack_values),
        "sfm_max_frame_size": st.one_of(st.integers(-5, 2**40), msgpack_values),
        "role": msgpack_values,
    },
)


@st.composite
def wire_frames(draw) -> bytes:
    """Bytes that are sometimes noise, sometimes nearly a frame, often a well-formed frame of any type."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=40))
    ftype = draw(st.one_of(st.sampled_from(list(FrameType)), st.integers(0, 255)))
    headers = draw(st.one_of(st.just(b""), st.binary(max_size=12), msgpack_values.map(msgpack.packb)))
    payload = draw(
        st.one_of(
            st.just(b""),
            st.binary(max_size=40),
            msgpack_values.map(msgpack.packb),
            handshake_maps.map(msgpack.packb),
        )
    )
    length, header_len = PREFIX_LEN + len(headers) + len(payload), len(headers)
    if draw(st.integers(0, 5)) == 0:
        length = draw(st.integers(0, 2**32 - 1))
    if draw(st.integers(0, 5)) == 0:
        header_len = draw(st.integers(0, 0xFFFF))
    fields = draw(st.tuples(st.integers(0, 255), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)))
    reserved, flags, app_id = fields
    return PREFIX.pack(length, header_len, ftype, reserved, flags, app_id, 17, 1) + headers + payload


@settings(max_examples=400)
@given(state=st.sampled_from(ALL_STATES), frames=st.lists(wire_frames(), min_size=1, max_size=6))
def test_receive_never_raises(state: str, frames: list[bytes]) -> None:
    """receive() of arbitrary bytes, in every state, only returns events (or None); a ProtocolError leaves it CLOSED."""
    session = make(state, max_frame_size=4096)
    for frame in frames:
        was_closed = session.state is State.CLOSED
        event = session.receive(frame)
        assert event is None or isinstance(event, EVENT_TYPES)
        if isinstance(event, ProtocolError):
            assert session.state is State.CLOSED and event.reason
        if was_closed:
            assert session.state is State.CLOSED
        if isinstance(event, HelloReceived):
            session.accept(TS)  # the shell's part; it must be possible right away
        if isinstance(event, Frame):
            assert event.type == FrameType.DATA and session.state in (State.OPEN, State.CLOSING)


HYPO_LIVE = Liveness(interval=1.0, dead_after=3, handshake_timeout=5.0)  # dead_timeout 3 s
ROUND = HYPO_LIVE.interval / 2  # the shell ticks both sides and delivers everything at least this often
SIDES = st.sampled_from(["client", "server"])
LIMITS = st.sampled_from([300, 600, MAX_FRAME_SIZE])  # all above the handshake frames (about 130 bytes)
EXTENSIONS = st.frozensets(st.sampled_from(["grpc-batch", "zip", "frame-limit"]), max_size=3)


class TwoSessions(RuleBasedStateMachine):
    """Two sessions against each other under a fake clock, with a shell that delivers and ticks at least every ROUND."""

    def __init__(self) -> None:
        super().__init__()
        self.pair: Pair | None = None

    @initialize(client_ext=EXTENSIONS, server_ext=EXTENSIONS, client_max=LIMITS, server_max=LIMITS)
    def connect(self, client_ext, server_ext, client_max, server_max) -> None:
        self.pair = Pair(
            now=0.0, liveness=HYPO_LIVE, client_ext=client_ext, server_ext=server_ext,
            client_max=client_max, server_max=server_max,
        ).handshake()  # fmt: skip
        self.last_round = 0.0
        self.agreed = (client_ext | CORE_EXTENSIONS) & (server_ext | CORE_EXTENSIONS)
        self.limit = min(client_max, server_max)
        self.expected = {self.pair.client: deque(), self.pair.server: deque()}  # messages on their way to a side
        self.stream_ids = {self.pair.client: itertools.count(17), self.pair.server: itertools.count(0xFFF0)}

    def side(self, name: str) -> Session:
        return getattr(self.pair, name)

    def round(self) -> None:
        """The shell's heartbeat: tick both sides, deliver everything both ways."""
        self.pair.tick(self.pair.client)
        self.pair.tick(self.pair.server)
        self.pair.flush()
        self.last_round = self.pair.now

    @rule(dt=st.floats(0, 10.0))
    def advance(self, dt: float) -> None:
        target = self.pair.now + dt
        while target - self.last_round > ROUND:
            self.pair.now = self.last_round + ROUND
            self.round()
        self.pair.now = target

    @rule(name=SIDES)
    def tick(self, name: str) -> None:
        self.pair.tick(self.side(name))

    @rule(name=SIDES, count=st.integers(1, 4))
    def deliver_some(self, name: str, count: int) -> None:
        self.pair.deliver(self.side(name), count)

    @rule()
    def deliver_all(self) -> None:
        self.pair.flush()

    @rule(name=SIDES)
    def heard(self, name: str) -> None:
        self.side(name).heard(self.pair.now)

    @rule(name=SIDES)
    def progressed(self, name: str) -> None:
        self.side(name).progressed(self.pair.now)

    @rule(
        name=SIDES,
        app_id=st.integers(0, 0xFFFF),
        headers=headers_st,
        payload=st.binary(max_size=700),
        shape=st.sampled_from(["bytes", "bytearray", "memoryview", "list"]),
    )
    def send(self, name: str, app_id: int, headers: dict, payload: bytes, shape: str) -> None:
        sender = self.side(name)
        stream_id = next(self.stream_ids[sender]) & 0xFFFF
        half = len(payload) // 2
        body = {
            "bytes": payload,
            "bytearray": bytearray(payload),
            "memoryview": memoryview(payload),
            "list": [payload[:half], memoryview(payload)[half:]],
        }[shape]
        length = PREFIX_LEN + (len(msgpack.packb(headers)) if headers else 0) + len(payload)
        try:
            bufs = sender.data_frame(app_id, stream_id, headers, body)
        except CommError as e:
            assert e.code == CommError.BAD_DATA and length > self.limit, (e, length, self.limit)
            return
        assert length <= self.limit
        self.pair.put(sender, bufs)
        self.expected[self.pair.other(sender)].append((app_id, stream_id, headers or None, payload or None))

    @precondition(lambda self: self.pair is not None and self.limit < MAX_FRAME_SIZE)
    @rule(name=SIDES, offset=st.integers(-2, 2), headers=st.one_of(st.just({}), headers_st))
    def send_at_the_limit(self, name: str, offset: int, headers: dict) -> None:
        """A frame of the agreed limit plus or minus a byte or two: exactly those over it are refused."""
        size = self.limit - PREFIX_LEN - (len(msgpack.packb(headers)) if headers else 0) + offset
        self.send(name, 1, headers, b"L" * max(size, 0), "bytes")

    @invariant()
    def messages_arrive_once_in_order_intact(self) -> None:
        if self.pair is None:
            return
        for session, expected in self.expected.items():
            received = self.pair.received[session]
            while received:
                frame = received.pop(0)
                assert expected, f"{session.local_name} got a message that was not sent, or got one twice"
                payload = None if frame.payload is None else bytes(frame.payload)
                assert (frame.app_id, frame.stream_id, frame.headers, payload) == expected.popleft()

    @invariant()
    def nobody_expires_or_errs(self) -> None:
        if self.pair is None:
            return
        for session in (self.pair.client, self.pair.server):
            assert not self.pair.failures[session], self.pair.failures[session][0].reason
            assert session.state is State.OPEN
            assert not any(isinstance(e, Ignored) for e in self.pair.events[session])

    @invariant()
    def both_agree_on_extensions_and_limits(self) -> None:
        if self.pair is None:
            return
        assert self.pair.client.extensions == self.pair.server.extensions == self.agreed
        assert self.pair.client.send_limit == self.pair.server.send_limit == self.limit

    def teardown(self) -> None:
        if self.pair is None:
            return
        self.pair.flush()
        self.messages_arrive_once_in_order_intact()
        assert not self.expected[self.pair.client] and not self.expected[self.pair.server], "a message was lost"


TwoSessions.TestCase.settings = settings(max_examples=150, stateful_step_count=60)
test_two_sessions = TwoSessions.TestCase


# -- the refusal extension: a refused sfm peer is told why ------------------------------------


def test_a_refused_sfm_peer_is_told_why_and_its_session_says_so() -> None:
    """A HELLO offering ``refusal`` that the listener refuses (here: it claims the listener's
    own name) gets a refusal READY; the client's session turns it into Refused, CLOSED."""
    server = Session("server", None, active=False, now=0.0)
    client = Session("server", None, active=True, now=0.0)  # the mistake: the server's own name
    event = server.receive(client.initiate(TS))
    assert isinstance(event, ProtocolError) and server.state is State.CLOSED
    assert "our own endpoint name 'server'" in event.reason
    assert event.frame is not None and hs_map(event.frame)["sfm_refused"] == event.reason
    assert "timestamp" not in hs_map(event.frame)  # the session reads no clock
    told = client.receive(event.frame)
    assert isinstance(told, Refused) and client.state is State.CLOSED
    assert told.reason == f"the listener refused our handshake; its reason: {event.reason}"
    assert client.close_reason == told.reason


def test_a_plain_peer_is_not_told_why() -> None:
    """NVFlare offers no extensions: a refused HELLO of its gets no refusal READY, and the
    listener's own refuse() after HelloReceived gives no frame either."""
    server = Session("server", None, active=False, now=0.0)
    event = server.receive(hello(name="server", ext=()))
    assert isinstance(event, ProtocolError) and event.frame is None
    server = Session("server", None, active=False, now=0.0)
    assert isinstance(server.receive(hello(ext=())), HelloReceived)
    assert server.refuse("identity check failed") is None and server.state is State.CLOSED


def test_refuse_after_hello_gives_the_refusal_frame_to_an_sfm_peer() -> None:
    server = Session("server", None, active=False, now=0.0)
    assert isinstance(server.receive(hello(ext=("refusal",))), HelloReceived)
    frame = server.refuse("certificate is for 'site-2'")
    assert frame is not None and decode_frame(frame).type == FrameType.READY
    assert hs_map(frame) == {"endpoint_name": "server", "sfm_refused": "certificate is for 'site-2'"}


@given(st.binary(max_size=64))
def test_a_garbled_hello_never_breaks_the_refusal_path(payload: bytes) -> None:
    server = Session("server", None, active=False, now=0.0)
    event = server.receive(raw(FrameType.HELLO, payload))
    assert server.state in (State.ACCEPTING, State.CLOSED)
    if isinstance(event, ProtocolError) and event.frame is not None:
        assert isinstance(hs_map(event.frame)["sfm_refused"], str)
