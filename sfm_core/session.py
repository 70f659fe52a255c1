"""The SFM protocol of one connection, as a sans-I/O state machine.

In the manner of ``h11`` and ``websockets``' ``protocol.py``: whole frames in, events out,
frames to send out as buffers, the clock passed in. Nothing here touches a socket, a
thread, an event loop or a clock; the I/O shell (:mod:`sfm_core.conn_manager`) moves the
frames, runs the timer and acts on the events. Every rule of the wire protocol
(``docs/wire-protocol.md``) and every refusal lives here.

States and transitions (``_RECEIVE`` is the whole table for received frames)::

                 passive                                   active
              AWAIT_HELLO                                AWAIT_READY  <- initiate(): HELLO
                   | HELLO -> HelloReceived                   | READY -> ReadyReceived
                   v                                          |
               ACCEPTING --accept(): READY--> OPEN <----------+
                   | refuse(reason)           |  DATA -> Frame, PING -> SendPong, PONG
                   v                          |  begin_close(): CLOSING (sends refused)
                CLOSED <--- a protocol error, a timeout (tick), connection_lost() ---+

PING and PONG are accepted in every state but CLOSED; a frame type the protocol reserves
(FRAG, ACK) or does not know is ignored, as the original does. A peer that offered the
``refusal`` extension is told why it was refused (a refusal READY, from ``refuse()`` or in
``ProtocolError.frame``); on the active side such a READY is a :class:`Refused` event.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from enum import Enum
from typing import Union

from . import frames as fr
from .errors import CommError
from .frames import MAX_FRAME_SIZE, PREFIX, PREFIX_LEN, Frame, FrameType, Payload
from .handshake import (
    FRAME_LIMIT_EXTENSION,
    REFUSAL_EXTENSION,
    PeerHello,
    build_handshake,
    build_refusal,
    decode_ping_payload,
    negotiate,
    offered_extensions,
    parse_handshake,
    refusal_reason,
)

#: The extensions the session itself offers (the transport may offer more).
CORE_EXTENSIONS = frozenset({FRAME_LIMIT_EXTENSION, REFUSAL_EXTENSION})

#: PING and PONG carry msgpack nil, as the original sends.
HEARTBEAT_PAYLOAD = b"\xc0"


class State(Enum):
    """Where a connection's protocol stands."""

    AWAIT_HELLO = "awaiting HELLO"  # passive: the transport is up; the peer speaks first
    AWAIT_READY = "awaiting READY"  # active: HELLO sent
    ACCEPTING = "accepting"  # passive: HELLO received; the shell decides (accept or refuse)
    OPEN = "open"
    CLOSING = "closing"  # our side is closing: nothing new is sent, what is queued drains
    CLOSED = "closed"


# -- events ----------------------------------------------------------------------------------
# A received DATA frame is returned as the decoded :class:`~sfm_core.frames.Frame` itself:
# the hot path builds no event object of its own.


class HelloReceived:
    """Passive side: the peer said who it is. Call :meth:`Session.accept` or :meth:`Session.refuse`."""

    __slots__ = ("peer",)

    def __init__(self, peer: PeerHello) -> None:
        self.peer = peer


class ReadyReceived:
    """Active side: the peer answered READY; the connection is open."""

    __slots__ = ("peer",)

    def __init__(self, peer: PeerHello) -> None:
        self.peer = peer


class SendPong:
    """A PING arrived: send ``frame`` (a PONG) ahead of queued data."""

    __slots__ = ("frame",)

    def __init__(self, frame: bytes) -> None:
        self.frame = frame


class PingDue:
    """The heartbeat timer fired: send ``frame`` (a PING) ahead of queued data."""

    __slots__ = ("frame",)

    def __init__(self, frame: bytes) -> None:
        self.frame = frame


class ProtocolError:
    """The peer broke the protocol; the session is CLOSED and the connection must close.

    ``frame``, when set, is a refusal READY to send before closing: the peer offered the
    ``refusal`` extension, so it may be told ``reason``."""

    __slots__ = ("frame", "reason")

    def __init__(self, reason: str, frame: bytes | None = None) -> None:
        self.reason = reason
        self.frame = frame


class Refused:
    """Active side: the listener refused our HELLO and said why (``refusal``); CLOSED."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class Expired:
    """A timer ran out (no handshake in time, or a dead peer); the session is CLOSED."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class Ignored:
    """A frame the protocol lets us ignore (a reserved or unknown type)."""

    __slots__ = ("quiet", "reason")

    def __init__(self, reason: str, quiet: bool = False) -> None:
        self.reason = reason
        #: Not worth a warning (a frame that arrived after the session closed).
        self.quiet = quiet


Event = Union[Frame, HelloReceived, ReadyReceived, SendPong, PingDue, ProtocolError, Refused, Expired, Ignored]


class Liveness:
    """The heartbeat settings of a session: PING every ``interval`` s whatever the traffic;
    the peer is dead after ``dead_timeout`` s with nothing heard and no send progress."""

    __slots__ = ("dead_timeout", "handshake_timeout", "interval")

    def __init__(self, interval: float = 30.0, dead_after: float = 3, handshake_timeout: float = 10.0) -> None:
        if interval <= 0 or dead_after < 1 or handshake_timeout <= 0:
            raise CommError(
                CommError.BAD_CONFIG,
                f"heartbeat_interval ({interval}) and handshake_timeout ({handshake_timeout}) must be positive "
                f"and dead_after ({dead_after}) at least 1",
            )
        self.interval = interval
        self.dead_timeout = interval * dead_after
        self.handshake_timeout = handshake_timeout


class Session:
    """The protocol state of one connection; see the module docstring.

    ``active`` is the connecting side (it sends HELLO). ``max_frame_size`` is the largest
    frame we accept; ``extensions`` are what the transport offers (the session adds
    ``frame-limit`` itself). ``now`` is a monotonic time from the shell's clock.
    """

    def __init__(
        self,
        local_name: str,
        properties: dict | None,
        *,
        active: bool,
        now: float,
        max_frame_size: int = MAX_FRAME_SIZE,
        extensions: Iterable[str] = (),
        liveness: Liveness | None = None,
    ) -> None:
        self.local_name = local_name
        self.properties = dict(properties) if properties else {}
        self.active = active
        self.max_frame_size = max_frame_size
        self.offered = frozenset(extensions) | CORE_EXTENSIONS
        self.liveness = liveness or Liveness()
        self.state = State.AWAIT_READY if active else State.AWAIT_HELLO
        #: Set once the handshake is done: who the peer is, and the extensions both sides listed.
        self.peer: PeerHello | None = None
        self.extensions: frozenset[str] = frozenset()
        #: The largest frame we may send: ours, and the peer's own once it announced it.
        self.send_limit = max_frame_size
        #: Why the session closed, once it has.
        self.close_reason: str | None = None
        self.created = now
        self.last_heard = now
        self.last_progress = now
        self._next_ping = now + self.liveness.interval
        #: Heartbeat counters, for tests and diagnostics.
        self.pings_sent = 0
        self.pongs_received = 0
        # next() of itertools.count is atomic under the GIL: control frames are numbered from
        # any thread without the data path's write role.
        self._sequence = itertools.count(1)
        #: Stream ids of PING/PONG: 1 until the shell hands over the endpoint's own counter.
        self.stream_ids: Iterator[int] = itertools.repeat(1)

    # -- the handshake ---------------------------------------------------------------------

    def initiate(self, timestamp: float) -> bytes:
        """Active side: the HELLO to send first (``timestamp``: wall-clock seconds)."""
        if not self.active or self.state is not State.AWAIT_READY:
            raise CommError(CommError.ERROR, f"initiate() in state {self.state.value} on the {self._side} side")
        return self._handshake_frame(FrameType.HELLO, self.offered, timestamp)

    def accept(self, timestamp: float) -> bytes:
        """Passive side, after :class:`HelloReceived`: the READY to send; the session is OPEN.

        READY lists only extensions the peer offered too: a plain peer sees no ``sfm_ext``.
        """
        if self.state is not State.ACCEPTING:
            raise CommError(CommError.ERROR, f"accept() in state {self.state.value}")
        self.state = State.OPEN
        return self._handshake_frame(FrameType.READY, self.extensions, timestamp)

    def refuse(self, reason: str) -> bytes | None:
        """Passive side, after :class:`HelloReceived`: refuse the peer; the session is CLOSED.

        Returns the refusal READY to send before closing if the peer offered ``refusal``
        (an sfm peer), else None (a plain peer, NVFlare's, just sees the connection close)."""
        self._close(reason)
        return self._refusal(reason) if REFUSAL_EXTENSION in self.extensions else None

    def _refusal(self, reason: str) -> bytes:
        return self._control_frame(FrameType.READY, build_refusal(self.local_name, reason), stream_id=1)

    def _handshake_frame(self, frame_type: int, extensions: frozenset[str], timestamp: float) -> bytes:
        payload = build_handshake(self.local_name, self.properties, extensions, timestamp, self.max_frame_size)
        return self._control_frame(frame_type, payload, stream_id=1)

    def adopt(self, peer: PeerHello) -> None:
        """Open with a peer the shell learned of another way (``ConnManager.update_endpoint``).

        Raises ``CommError(CLOSED)`` once the session is closing or closed: it never reopens."""
        if self.state in (State.CLOSING, State.CLOSED):
            raise CommError(CommError.CLOSED, f"cannot adopt {peer.name!r}: the connection is {self.state.value}")
        self._open(peer)
        self.state = State.OPEN

    def _open(self, peer: PeerHello) -> None:
        self.peer = peer
        self.extensions = negotiate(self.offered, peer.extensions)
        self.send_limit = self.max_frame_size  # a peer adopted later brings its own limit, or none
        if FRAME_LIMIT_EXTENSION in self.extensions and peer.max_frame_size is not None:
            self.send_limit = min(self.max_frame_size, peer.max_frame_size)

    @property
    def driver_extensions(self) -> frozenset[str]:
        """The agreed extensions the transport offered (what ``Connection.extensions`` gets)."""
        return self.extensions - CORE_EXTENSIONS

    # -- receiving -------------------------------------------------------------------------

    def receive(self, frame: fr.Buffer) -> Event | None:
        """Take one whole received frame; return what it means (see the events above)."""
        try:
            decoded = fr.decode_frame(frame, self.max_frame_size)
        except CommError as e:
            return self._error(e.message or str(e))
        if decoded.type == _DATA and self.state is _OPEN:
            return decoded  # the hot path
        handler = _RECEIVE.get((self.state, decoded.type))
        if handler is None:
            return self._unexpected(decoded)
        try:
            return handler(self, decoded)  # type: ignore[operator]
        except CommError as e:
            return self._error(e.message or str(e))

    def _on_hello(self, frame: Frame) -> Event:
        try:
            peer = parse_handshake(frame.payload, self.local_name)
        except CommError as e:
            reason = e.message or str(e)
            told = REFUSAL_EXTENSION in offered_extensions(frame.payload) & self.offered
            self._close(reason)
            return ProtocolError(reason, self._refusal(reason) if told else None)
        self._open(peer)
        self.state = State.ACCEPTING
        return HelloReceived(peer)

    def _on_ready(self, frame: Frame) -> Event:
        refused = refusal_reason(frame.payload)
        if refused is not None:
            reason = f"the listener refused our handshake; its reason: {refused}"
            self._close(reason)
            return Refused(reason)
        peer = parse_handshake(frame.payload, self.local_name)
        self._open(peer)
        self.state = State.OPEN
        return ReadyReceived(peer)

    def _on_data(self, frame: Frame) -> Event:
        return frame  # DATA while CLOSING: our side is closing, the peer's data still counts

    def _on_ping(self, frame: Frame) -> Event:
        decode_ping_payload(frame.payload)
        return SendPong(self._control_frame(FrameType.PONG, HEARTBEAT_PAYLOAD))

    def _on_pong(self, frame: Frame) -> None:
        decode_ping_payload(frame.payload)  # a PONG only shows the peer is alive: heard() said so
        self.pongs_received += 1

    def _unexpected(self, frame: Frame) -> Event:
        ftype = frame.type
        if ftype not in _KNOWN_TYPES or ftype in (FrameType.FRAG, FrameType.ACK):
            return Ignored(f"ignoring frame of {_type_name(ftype)}")
        if self.state is State.CLOSED:
            return Ignored(f"ignoring {_type_name(ftype)} after the session closed", quiet=True)
        if ftype == FrameType.DATA:
            return self._error("DATA frame before the handshake")
        if self.state in (State.OPEN, State.CLOSING, State.ACCEPTING):
            return self._error(f"second handshake frame ({_type_name(ftype)})")
        expected = FrameType.READY if self.active else FrameType.HELLO
        return self._error(f"got {_type_name(ftype)} where {expected.name} was expected")

    def _error(self, reason: str) -> ProtocolError:
        self._close(reason)
        return ProtocolError(reason)

    # -- liveness --------------------------------------------------------------------------

    def heard(self, now: float) -> None:
        """Bytes arrived from the peer, or we are still busy with what arrived: not dead."""
        self.last_heard = now

    def progressed(self, now: float) -> None:
        """A send that waited for the transport moved on: the peer is reading, if slowly."""
        self.last_progress = now

    def tick(self, now: float) -> Event | None:
        """Run the timers: a PING due, a handshake that took too long, a dead peer."""
        state = self.state
        live = self.liveness
        if state in (State.AWAIT_HELLO, State.AWAIT_READY, State.ACCEPTING):
            if now - self.created > live.handshake_timeout:
                reason = f"no handshake within {live.handshake_timeout} s"
                self._close(reason)
                return Expired(reason)
            return None
        if state is not State.OPEN and state is not State.CLOSING:
            return None
        quiet = now - max(self.last_heard, self.last_progress)
        if quiet > live.dead_timeout:
            reason = f"nothing heard from the peer and no send progress for {quiet:.1f} s"
            self._close(reason)
            return Expired(reason)
        if now >= self._next_ping:
            self._next_ping = now + live.interval
            self.pings_sent += 1
            return PingDue(self._control_frame(FrameType.PING, HEARTBEAT_PAYLOAD))
        return None

    # -- sending ---------------------------------------------------------------------------

    def data_frame(self, app_id: int, stream_id: int, headers: dict | None, payload: Payload | None) -> list:
        """Encode a DATA frame as ``[head, *payload buffers]`` (the payload is not copied).

        The shell calls it under the lock that orders frames on the wire, so the sequence
        numbers go out in order. Raises ``CommError`` before anything is sent: CLOSED unless
        OPEN, BAD_DATA for headers msgpack cannot encode or a frame over either side's limit.
        """
        if self.state is not _OPEN:
            code = CommError.NOT_READY if self.state is State.ACCEPTING else CommError.CLOSED
            raise CommError(code, f"connection is {self.state.value}")
        hb = fr.encode_headers(headers) if headers else b""
        if payload is None:
            bufs: list = []
            size = 0
        elif type(payload) is bytes or type(payload) is bytearray:
            bufs = [payload] if payload else []
            size = len(payload)
        else:
            bufs = fr.payload_buffers(payload)
            size = fr.payload_length(bufs)
        length = PREFIX_LEN + len(hb) + size
        if length > self.send_limit:
            self._too_big(length, len(hb))
        head = PREFIX.pack(length, len(hb), _DATA, 0, 0, app_id, stream_id, next(self._sequence) & 0xFFFF)
        return [head + hb if hb else head, *bufs]

    def data_frames(self, app_id: int, stream_ids, messages) -> list:
        """Encode several DATA frames (``messages``: ``(headers, payload)`` pairs, with
        ``stream_ids`` one per message), their buffers back to back in one list. Every
        frame is checked before any sequence number is taken, so a refusal (as in
        :meth:`data_frame`) leaves nothing half-encoded; payloads are not copied."""
        if self.state is not _OPEN:
            code = CommError.NOT_READY if self.state is State.ACCEPTING else CommError.CLOSED
            raise CommError(code, f"connection is {self.state.value}")
        limit = self.send_limit
        parts = []
        # The same measuring as data_frame and check_data, written out again on purpose:
        # data_frame is the one-message hot path, and calling check_data per message here cost
        # the batch path 0.1-0.2 us a message (15-25 %, measured).
        for headers, payload in messages:
            hb = fr.encode_headers(headers) if headers else b""
            if payload is None:
                bufs: list = []
                size = 0
            elif type(payload) is bytes or type(payload) is bytearray:
                bufs = [payload] if payload else []
                size = len(payload)
            else:
                bufs = fr.payload_buffers(payload)
                size = fr.payload_length(bufs)
            length = PREFIX_LEN + len(hb) + size
            if length > limit:
                self._too_big(length, len(hb))
            parts.append((length, hb, bufs))
        out: list = []
        append, extend = out.append, out.extend
        pack, seq = PREFIX.pack, self._sequence
        for (length, hb, bufs), stream_id in zip(parts, stream_ids, strict=True):
            head = pack(length, len(hb), _DATA, 0, 0, app_id, stream_id, next(seq) & 0xFFFF)
            append(head + hb if hb else head)
            if bufs:
                extend(bufs)
        return out

    def check_data(self, headers: dict | None, payload: Payload | None) -> tuple[int, bytes, list]:
        """Check one DATA frame as :meth:`data_frame` does (same errors) and encode its
        headers, but take no sequence number yet: ``(length, header bytes, payload buffers)``
        for :meth:`number_data`. For a frame that waits in a queue: it is numbered when it is
        written, so the numbers follow the order on the wire."""
        if self.state is not _OPEN:
            code = CommError.NOT_READY if self.state is State.ACCEPTING else CommError.CLOSED
            raise CommError(code, f"connection is {self.state.value}")
        hb = fr.encode_headers(headers) if headers else b""
        if payload is None:
            bufs: list = []
            size = 0
        elif type(payload) is bytes or type(payload) is bytearray:
            bufs = [payload] if payload else []
            size = len(payload)
        else:
            bufs = fr.payload_buffers(payload)
            size = fr.payload_length(bufs)
        length = PREFIX_LEN + len(hb) + size
        if length > self.send_limit:
            self._too_big(length, len(hb))
        return length, hb, bufs

    def number_data(self, items: list[tuple[int, int, tuple[int, bytes, list]]]) -> list:
        """Number and pack frames checked by :meth:`check_data`, given as ``(app_id,
        stream_id, checked)``, in order: their buffers back to back in one list. No state
        check: they were accepted while the session was open, and may drain while it closes."""
        out: list = []
        append, extend = out.append, out.extend
        pack, seq = PREFIX.pack, self._sequence
        for app_id, stream_id, (length, hb, bufs) in items:
            head = pack(length, len(hb), _DATA, 0, 0, app_id, stream_id, next(seq) & 0xFFFF)
            append(head + hb if hb else head)
            if bufs:
                extend(bufs)
        return out

    def _too_big(self, length: int, header_len: int) -> None:
        if self.send_limit == self.max_frame_size:
            fr.check_prefix(length, header_len, self.max_frame_size)
        raise CommError(
            CommError.BAD_DATA,
            f"frame length {length} exceeds the peer's maximum frame size of {self.send_limit} bytes "
            f"(announced in its handshake; ours is {self.max_frame_size})",
        )

    def _control_frame(self, frame_type: int, payload: bytes, stream_id: int | None = None) -> bytes:
        if stream_id is None:
            stream_id = next(self.stream_ids) & 0xFFFF
        seq = next(self._sequence) & 0xFFFF
        return PREFIX.pack(PREFIX_LEN + len(payload), 0, frame_type, 0, 0, 0, stream_id, seq) + payload

    # -- closing ---------------------------------------------------------------------------

    def begin_close(self) -> None:
        """Our side closes: no new DATA is encoded; what was accepted may still drain.

        Before the handshake there is nothing to drain: the session is CLOSED."""
        if self.state is State.OPEN:
            self.state = State.CLOSING
        elif self.state is not State.CLOSING:
            self._close("closed by our side before the handshake completed")

    def connection_lost(self, reason: str = "the transport closed") -> None:
        """The transport is gone."""
        self._close(reason)

    def _close(self, reason: str) -> None:
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
            self.close_reason = reason

    @property
    def _side(self) -> str:
        return "active" if self.active else "passive"

    def __repr__(self) -> str:
        peer = self.peer.name if self.peer else None
        return f"Session({self.local_name!r} {self._side}, {self.state.value}, peer={peer!r})"


_KNOWN_TYPES = frozenset(int(t) for t in FrameType)
# Plain values for the hot paths: an enum member lookup costs more than the rest of a check.
_DATA = int(FrameType.DATA)
_OPEN = State.OPEN

_HEARTBEAT_STATES = (State.AWAIT_HELLO, State.AWAIT_READY, State.ACCEPTING, State.OPEN, State.CLOSING)

#: The transition table: (state, received frame type) -> handler. What is not here is a
#: protocol error or an ignored frame (see ``Session._unexpected``).
_RECEIVE = {
    (State.AWAIT_HELLO, FrameType.HELLO): Session._on_hello,
    (State.AWAIT_READY, FrameType.READY): Session._on_ready,
    (State.CLOSING, FrameType.DATA): Session._on_data,
    **{(s, FrameType.PING): Session._on_ping for s in _HEARTBEAT_STATES},
    **{(s, FrameType.PONG): Session._on_pong for s in _HEARTBEAT_STATES},
}


def _type_name(ftype: int) -> str:
    return FrameType(ftype).name if ftype in _KNOWN_TYPES else f"unknown type {ftype}"
