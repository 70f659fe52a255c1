"""Fuzz the sans-I/O Session (sfm_core/session.py) with fuzzer-chosen frames, calls and clock ticks.

Run: ``python fuzz/fuzz_session.py [libFuzzer flags] [corpus dirs]`` (see docs/fuzzing.md).

The input's first bytes choose a passive or an active session and its limits; the rest is a
sequence of steps, each one op byte and its arguments: a received frame (a HELLO, READY, DATA,
PING, PONG, FRAG/ACK or unknown type made with the codec's encoder from fuzzer-chosen fields, a
valid frame with a byte changed, or raw garbage), a clock step and ``tick(now)``, ``heard`` /
``progressed``, or a call of the shell (``initiate``, ``accept``, ``refuse``, ``data_frame``,
``begin_close``, ``connection_lost``, ``adopt`` before CLOSING).

Checked after every step:

* ``receive``, ``tick``, ``refuse``, ``begin_close``, ``connection_lost``, ``heard`` and
  ``progressed`` raise nothing; ``initiate``, ``accept`` and ``data_frame`` raise only
  ``CommError``, and only when the state says they must (and then change nothing).
* the state only moves along the table (``ALLOWED``), and each event comes with the move it
  means (HelloReceived: AWAIT_HELLO -> ACCEPTING, ReadyReceived: AWAIT_READY -> OPEN,
  ProtocolError / Expired: -> CLOSED, a DATA Frame / SendPong / Ignored / None: no move).
* once CLOSED it stays CLOSED, with the first ``close_reason``, and emits no frame: no SendPong
  or PingDue, ``initiate``/``accept``/``data_frame`` refuse. (A frame that does not decode
  still gets a ProtocolError after CLOSED, where a good one is Ignored: allowed, noted in
  docs/fuzzing.md.)
* every frame the session emits decodes with the codec and is of the right type (a DATA frame
  within ``send_limit``; control frames are not held to it, see docs/fuzzing.md), carries the
  next sequence number (mod 2**16), and a HELLO or READY parses as a handshake naming us.
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fuzzinput import Input, fuzz, instrumented

with instrumented(__name__ == "__main__"):
    from sfm_core.errors import CommError
    from sfm_core.frames import MAX_FRAME_SIZE, Frame, FrameType, decode_frame, encode_frame
    from sfm_core.handshake import FRAME_LIMIT_EXTENSION, build_handshake, parse_handshake
    from sfm_core.session import (
        Expired,
        HelloReceived,
        Ignored,
        Liveness,
        PingDue,
        ProtocolError,
        ReadyReceived,
        SendPong,
        Session,
        State,
    )

S = State
#: Every move the state may make in one step (staying put is always allowed).
ALLOWED = {
    S.AWAIT_HELLO: {S.ACCEPTING, S.OPEN, S.CLOSED},  # -> OPEN: adopt()
    S.AWAIT_READY: {S.OPEN, S.CLOSED},
    S.ACCEPTING: {S.OPEN, S.CLOSED},
    S.OPEN: {S.CLOSING, S.CLOSED},
    S.CLOSING: {S.CLOSED},
    S.CLOSED: set(),
}
PASSIVE_STATES = {S.AWAIT_HELLO, S.ACCEPTING, S.OPEN, S.CLOSING, S.CLOSED}
ACTIVE_STATES = {S.AWAIT_READY, S.OPEN, S.CLOSING, S.CLOSED}
HANDSHAKE_STATES = (S.AWAIT_HELLO, S.AWAIT_READY, S.ACCEPTING)
#: adopt() opens a session that has not finished its handshake (or is open already).
ADOPT_FROM = (*HANDSHAKE_STATES, S.OPEN)

NOW = 1000.0
TS = 1_700_000_000.25
PEER_NAMES = ("site-1", "server", "client", "bad name", "a.a", "")
MAX_SIZES = (MAX_FRAME_SIZE, 1 << 20, 4096, 64, 16)
PEER_LIMITS = (None, 16, 17, 64, 4096, 1 << 20, MAX_FRAME_SIZE, 1 << 40)
OTHER_TYPES = (FrameType.FRAG, FrameType.ACK, 0, 8, 255)


class Checker:
    """The session under test and what the checks need to remember."""

    def __init__(self, inp: Input) -> None:
        self.active = inp.bool()
        self.name = "site-1" if self.active else "server"
        self.max_frame_size = inp.choice(MAX_SIZES)
        interval = inp.choice((10.0, 0.5, 1e-9))
        live = Liveness(interval=interval, dead_after=inp.choice((1, 3, 2.5)), handshake_timeout=inp.choice((5.0, 0.1)))
        extensions = inp.choice(((), ("compression",), (FRAME_LIMIT_EXTENSION,)))
        self.now = NOW
        self.session = Session(
            self.name,
            {"role": "x"},
            active=self.active,
            now=self.now,
            max_frame_size=self.max_frame_size,
            extensions=extensions,
            liveness=live,
        )
        self.next_seq: int | None = None  # the sequence number the next emitted frame must carry
        self.closed = False
        self.close_reason: str | None = None

    # -- what the session emits ------------------------------------------------------------

    def emitted(self, data: bytes, ftype: int, limit: int) -> Frame:
        assert not self.closed, f"{FrameType(ftype).name} emitted after CLOSED"
        assert len(data) <= limit, (len(data), limit)
        frame = decode_frame(data, limit)
        assert frame.type == ftype, (frame.type, ftype)
        if self.next_seq is not None:
            assert frame.sequence == self.next_seq, (frame.sequence, self.next_seq)
        self.next_seq = (frame.sequence + 1) & 0xFFFF
        if ftype in (FrameType.HELLO, FrameType.READY):
            assert frame.headers is None
            peer = parse_handshake(frame.payload, "someone-else")
            assert peer.name == self.name
            assert peer.max_frame_size in (None, self.max_frame_size)
        return frame

    # -- the frames we feed it ---------------------------------------------------------------

    def handshake(self, inp: Input, ftype: int) -> bytes:
        name = inp.choice(PEER_NAMES)
        ext = inp.choice(((), (FRAME_LIMIT_EXTENSION,), (FRAME_LIMIT_EXTENSION, "compression"), ("compression",)))
        limit = inp.choice(PEER_LIMITS)
        props = {"role": "peer", "n": inp.byte()} if inp.bool() else None
        payload = build_handshake(name, props, ext, TS, limit)
        return b"".join(encode_frame(ftype, 0, 1, None, payload, sequence=inp.uint(2)))

    def frame(self, inp: Input, op: int) -> bytes:
        kind = op % 8
        if kind == 0:
            return self.handshake(inp, FrameType.HELLO)
        if kind == 1:
            return self.handshake(inp, FrameType.READY)
        if kind == 2:
            headers = {"h": inp.sized(8)} if inp.bool() else None
            payload = inp.sized(64) * (1 + inp.byte() % 3)
            return b"".join(encode_frame(FrameType.DATA, inp.uint(2), inp.uint(2), headers, payload))
        if kind in (3, 4):
            ftype = FrameType.PING if kind == 3 else FrameType.PONG
            payload = inp.choice((b"\xc0", None, b"\x80", b"\x81\xa1a\x01", b"\x01", b"\xc1", b"\xc0\xc0"))
            return b"".join(encode_frame(ftype, 0, inp.uint(2), None, payload))
        if kind == 5:
            return b"".join(encode_frame(inp.choice(OTHER_TYPES), 0, 0, None, inp.sized(16)))
        if kind == 6:  # a valid frame of any kind with one byte changed
            data = bytearray(self.frame(inp, inp.byte() % 6))
            at = inp.uint(2) % len(data)
            data[at] ^= inp.byte() or 1
            return bytes(data)
        return inp.sized()  # garbage

    # -- one step --------------------------------------------------------------------------

    def step(self, inp: Input) -> None:
        s = self.session
        before = s.state
        op = inp.byte()
        group = op >> 4
        if group < 8:
            frame = self.frame(inp, op)
            self.check_receive(frame, before, s.receive(frame))
        elif group < 10:
            delta = inp.choice((0.0, 0.05, 0.5, 1.0, 5.0, 10.0, 30.0, 31.0, 1e9, math.nextafter(0, 1)))
            self.now += delta * (1 + (op & 3))
            event = s.tick(self.now)
            self.check_tick(before, event)
        elif group == 10 and op & 2:
            self.adopt(inp, before)
        elif group == 10:
            (s.heard if op & 1 else s.progressed)(self.now)
            assert s.state is before
        elif group == 11:
            self.call(lambda: s.initiate(TS), FrameType.HELLO, ok=self.active and before is S.AWAIT_READY)
            assert s.state is before
        elif group == 12:
            self.call(lambda: s.accept(TS), FrameType.READY, ok=before is S.ACCEPTING)
            assert s.state is (S.OPEN if before is S.ACCEPTING else before)
        elif group == 13:
            self.data_frame(inp, before)
            assert s.state is before
        elif group == 14:
            if op & 1:
                s.refuse("refused by the fuzzer")
                assert s.state is S.CLOSED
            else:
                s.begin_close()
                assert s.state is {S.OPEN: S.CLOSING, S.CLOSING: S.CLOSING}.get(before, S.CLOSED)
        else:
            s.connection_lost("fuzzer")
            assert s.state is S.CLOSED
        self.check_state(before)

    def adopt(self, inp: Input, before: State) -> None:
        """``adopt(peer)``: the shell learned of the peer another way (``update_endpoint``)."""
        try:
            peer = parse_handshake(self.handshake(inp, FrameType.HELLO)[16:], self.name)
        except CommError:
            return  # a map the shell would not adopt either
        try:
            self.session.adopt(peer)
        except CommError as e:
            assert before not in ADOPT_FROM and e.code == CommError.CLOSED, f"adopt refused in {before}: {e}"
            assert self.session.state is before
            return
        assert before in ADOPT_FROM, f"adopt reopened a {before} session"
        assert self.session.state is S.OPEN and self.session.peer is peer
        self.check_send_limit()

    def call(self, fn, ftype: int, ok: bool) -> None:
        try:
            data = fn()
        except CommError as e:
            assert not ok, f"refused in {self.session.state}: {e}"
            assert e.code == CommError.ERROR, e
            return
        assert ok, f"{FrameType(ftype).name} made in state {self.session.state}"
        self.emitted(data, ftype, MAX_FRAME_SIZE)

    def data_frame(self, inp: Input, before: State) -> None:
        s = self.session
        kind = inp.byte()
        headers = (None, {}, {"k": kind}, {"big": b"x" * 70_000}, {"bad": {1, 2}})[kind % 5]
        kind = inp.byte() % 5
        payload = (
            b"p" * inp.uint(2) if kind == 2 else (None, b"", None, [b"ab", bytearray(b"cd")], memoryview(b"xyz"))[kind]
        )
        try:
            bufs = s.data_frame(inp.uint(2), inp.uint(2), headers, payload)
        except CommError as e:
            if before is not S.OPEN:
                assert e.code == (CommError.NOT_READY if before is S.ACCEPTING else CommError.CLOSED), e
            else:
                assert e.code == CommError.BAD_DATA, e
            return
        assert before is S.OPEN, f"DATA encoded in state {before}"
        self.emitted(b"".join(bytes(b) for b in bufs), FrameType.DATA, s.send_limit)

    # -- the checks ------------------------------------------------------------------------

    def check_receive(self, frame: bytes, before: State, event) -> None:
        after = self.session.state
        if isinstance(event, HelloReceived):
            assert (before, after) == (S.AWAIT_HELLO, S.ACCEPTING) and not self.active
            assert event.peer is self.session.peer and event.peer.name != self.name
        elif isinstance(event, ReadyReceived):
            assert (before, after) == (S.AWAIT_READY, S.OPEN) and self.active
            assert event.peer is self.session.peer and event.peer.name != self.name
        elif isinstance(event, ProtocolError):
            assert after is S.CLOSED, (before, after)
            assert isinstance(event.reason, str) and event.reason
            if before is S.CLOSED:  # only a frame that does not decode is judged after CLOSED
                assert not _decodes(frame, self.session.max_frame_size), "ProtocolError for a good frame after CLOSED"
        elif isinstance(event, Frame):
            assert before in (S.OPEN, S.CLOSING) and after is before and event.type == FrameType.DATA
        elif isinstance(event, SendPong):
            assert after is before and before is not S.CLOSED
            self.emitted(event.frame, FrameType.PONG, MAX_FRAME_SIZE)
        elif isinstance(event, Ignored):
            assert after is before
        elif event is None:  # a PONG
            assert after is before and before is not S.CLOSED
            assert decode_frame(frame, self.session.max_frame_size).type == FrameType.PONG
        else:
            raise AssertionError(f"receive() returned {event!r}")
        self.check_send_limit()

    def check_send_limit(self) -> None:
        s = self.session
        limit = s.peer.max_frame_size if s.peer is not None else None
        if FRAME_LIMIT_EXTENSION in s.extensions and limit is not None:
            assert s.send_limit == min(self.max_frame_size, limit)
        else:  # a second adopt() without frame-limit keeps the first peer's lower limit (noted in docs)
            assert s.send_limit <= self.max_frame_size
            if s.peer is None:
                assert s.send_limit == self.max_frame_size

    def check_tick(self, before: State, event) -> None:
        after = self.session.state
        if isinstance(event, Expired):
            assert before is not S.CLOSED and after is S.CLOSED
            if before in HANDSHAKE_STATES:
                assert self.now - self.session.created > self.session.liveness.handshake_timeout
        elif isinstance(event, PingDue):
            assert before in (S.OPEN, S.CLOSING) and after is before
            self.emitted(event.frame, FrameType.PING, MAX_FRAME_SIZE)
        else:
            assert event is None and after is before, (event, before, after)

    def check_state(self, before: State) -> None:
        s = self.session
        after = s.state
        assert after is before or after in ALLOWED[before], f"{before} -> {after}"
        assert after in (ACTIVE_STATES if self.active else PASSIVE_STATES), after
        assert s.extensions <= s.offered and s.driver_extensions == s.extensions - {FRAME_LIMIT_EXTENSION}
        assert after.value in repr(s)
        if after is S.CLOSED:
            assert s.close_reason, "CLOSED without a reason"
            if self.closed:
                assert s.close_reason == self.close_reason, "the close reason changed after CLOSED"
            self.closed, self.close_reason = True, s.close_reason
        else:
            assert not self.closed, "left CLOSED"
            assert s.close_reason is None


def _decodes(frame: bytes, max_frame_size: int) -> bool:
    try:
        decode_frame(frame, max_frame_size)
    except CommError:
        return False
    return True


def TestOneInput(data: bytes) -> None:
    inp = Input(data)
    checker = Checker(inp)
    for _ in range(200):
        if not inp.remaining:
            break
        checker.step(inp)


if __name__ == "__main__":
    fuzz(TestOneInput)
