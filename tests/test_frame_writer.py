"""The core's frame writer (sfm_core/frame_writer.py) on an in-memory connection: who writes,
in what order, what queues, and that nothing is ever left with no writer."""

from __future__ import annotations

import random
import threading

import pytest
from helpers import scaled, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

import sfm_core.frame_writer as fw
from sfm_core import CommError
from sfm_core.driver import Connection, ConnState
from sfm_core.frame_writer import FrameWriter
from sfm_core.frames import FrameDecoder, FrameType
from sfm_core.session import Session, State

PONG = b"PONG-FRAME"


class WireConn(Connection):
    """Keeps every write as ``(thread ident, call, bytes)``; ``gate`` (if set) holds the next write."""

    def __init__(self, batches: bool = True) -> None:
        super().__init__(None)
        self.state = ConnState.CONNECTED
        self.writes: list[tuple[int, str, bytes]] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()  # a write is being held at the gate
        self.fail_batches: Exception | None = None
        self.closed = False
        if not batches:
            self.send_frames = None  # type: ignore[assignment]

    def get_conn_properties(self) -> dict:
        return {}

    def close(self) -> None:
        self.closed = True
        self.state = ConnState.CLOSED

    def _hold(self) -> None:
        gate, self.gate = self.gate, None
        if gate is not None:
            self.entered.set()
            assert gate.wait(scaled(10)), "the test never opened the gate"

    def send_frame(self, frame) -> None:
        if self.closed:
            raise CommError(CommError.CLOSED, "closed")
        self._hold()
        self.writes.append((threading.get_ident(), "frame", b"".join(bytes(b) for b in frame)))

    def send_frames(self, bufs: list, count: int) -> None:
        self._hold()
        if self.fail_batches is not None:
            raise self.fail_batches
        self.writes.append((threading.get_ident(), f"frames:{count}", b"".join(bytes(b) for b in bufs)))

    def wire(self) -> bytes:
        return b"".join(w[2] for w in self.writes)


def open_session() -> Session:
    session = Session("a", {}, active=True, now=0.0)
    session.state = State.OPEN
    return session


def decoded(wire: bytes) -> list:
    from sfm_core.frames import decode_frame

    decoder = FrameDecoder(1 << 30)
    buf = decoder.get_buffer()
    frames = []
    view = memoryview(wire)
    while view:
        buf = decoder.get_buffer()
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        view = view[n:]
        frames += [
            decode_frame(bytes(f)) if not isinstance(f, bytes) else decode_frame(f) for f in decoder.buffer_updated(n)
        ]
    return frames


@pytest.fixture
def writer():
    conn = WireConn()
    session = open_session()
    w = FrameWriter(conn, session, "test-conn")
    yield w
    w.close()
    if w._thread is not None:
        w._thread.join(scaled(5))


def send(w: FrameWriter, payload: bytes, stream_id: int = 1) -> None:
    w.send_data(w.session, 7, stream_id, None, payload)


def held_write(w: FrameWriter, payload: bytes) -> tuple[threading.Thread, threading.Event]:
    """Start a send whose write the connection holds; return it once it is held."""
    gate = threading.Event()
    w.conn.entered.clear()
    w.conn.gate = gate
    t = threading.Thread(target=send, args=(w, payload))
    t.start()
    assert w.conn.entered.wait(scaled(5))
    return t, gate


def test_a_lone_frame_is_written_at_once_by_its_sender(writer) -> None:
    send(writer, b"one")
    [(ident, call, data)] = writer.conn.writes
    assert ident == threading.get_ident() and call == "frame"
    assert [bytes(f.payload) for f in decoded(data)] == [b"one"]
    assert writer._thread is None, "a lone frame started the background writer"


def test_frames_sent_during_a_write_queue_and_go_out_together_after_it(writer) -> None:
    first, gate = held_write(writer, b"first")
    others = [threading.Thread(target=send, args=(writer, f"m{i}".encode())) for i in range(3)]
    for t in others:
        t.start()
    for t in others:
        t.join(scaled(5))
        assert not t.is_alive(), "a small frame waited for the write in progress instead of queuing"
    assert writer.queued == 3
    gate.set()
    first.join(scaled(5))
    assert writer.drain(scaled(5)) == 0
    calls = [call for _ident, call, _data in writer.conn.writes]
    assert calls == ["frame", "frames:3"]
    frames = decoded(writer.conn.wire())
    assert bytes(frames[0].payload) == b"first"
    assert sorted(bytes(f.payload) for f in frames[1:]) == [b"m0", b"m1", b"m2"]
    assert [f.sequence for f in frames] == [1, 2, 3, 4], "sequence numbers do not follow the wire"


def test_a_queued_frame_keeps_the_bytes_it_had_when_its_send_returned(writer) -> None:
    first, gate = held_write(writer, b"first")
    buf = bytearray(b"before")
    send(writer, buf)  # queued behind the held write: the caller may refill its buffer now
    view = memoryview(bytearray(b"view-1"))
    send(writer, view)
    buf[:] = b"after!"
    view[:] = b"view-2"
    gate.set()
    first.join(scaled(5))
    writer.drain(scaled(5))
    assert [bytes(f.payload) for f in decoded(writer.conn.wire())] == [b"first", b"before", b"view-1"]


def test_a_sender_writes_only_its_own_frame(writer) -> None:
    first, gate = held_write(writer, b"first")
    others = [threading.Thread(target=send, args=(writer, b"x")) for _ in range(5)]
    for t in others:
        t.start()
    for t in others:
        t.join(scaled(5))
    gate.set()
    first.join(scaled(5))
    writer.drain(scaled(5))
    idents = [ident for ident, _call, _data in writer.conn.writes]
    assert idents[0] == first.ident and first.ident not in idents[1:]
    assert writer._thread is not None and set(idents[1:]) == {writer._thread.ident}


def test_a_control_frame_that_finds_a_write_in_progress_goes_right_after_it(writer) -> None:
    first, gate = held_write(writer, b"first")
    writer.send_control(PONG)  # returns at once: it never waits for the role
    t = threading.Thread(target=send, args=(writer, b"later"))
    t.start()
    t.join(scaled(5))
    gate.set()
    first.join(scaled(5))
    assert writer.drain(scaled(5)) == 0
    assert [w[2] for w in writer.conn.writes][1] == PONG, "the PONG did not go out first after the held write"
    assert writer.queued == 0


def test_a_control_frame_queued_as_the_writer_lets_go_is_not_left_behind(writer) -> None:
    """The direct writer lets go of the role without the lock: a PONG queued just before
    that must still be written by somebody (it found the role held)."""
    real = writer._role

    class Hooked:
        def __init__(self) -> None:
            self.hook = None

        def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
            return real.acquire(blocking, timeout)

        def release(self) -> None:
            hook, self.hook = self.hook, None
            if hook is not None:
                hook()  # another thread queues a PONG while the role is still held
            real.release()

        def locked(self) -> bool:
            return real.locked()

    hooked = Hooked()
    writer._role = hooked  # type: ignore[assignment]

    def queue_pong() -> None:
        t = threading.Thread(target=writer.send_control, args=(PONG,))
        t.start()
        t.join(scaled(5))

    hooked.hook = queue_pong
    send(writer, b"data")
    wait_until(lambda: writer.conn.writes[-1][2] == PONG, what="the PONG to be written")
    assert writer.queued == 0 and writer.drain(scaled(5)) == 0


def test_a_thread_never_overtakes_its_own_queued_frame(writer) -> None:
    """A frame queued while another thread wrote, then the same thread's next frame finding
    the role free before the writer that let go has handed the queue on: it goes after."""
    real = writer._role
    go, sent, armed = threading.Event(), threading.Event(), threading.Event()

    class ReleaseHook:
        def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
            return real.acquire(blocking, timeout)

        def release(self) -> None:
            real.release()
            if armed.is_set():
                armed.clear()
                go.set()  # between the held writer letting go and its look at the queue
                assert sent.wait(scaled(5))

    writer._role = ReleaseHook()  # type: ignore[assignment]
    first, gate = held_write(writer, b"first")

    def sender() -> None:
        send(writer, b"f1")  # queued behind the held write
        assert go.wait(scaled(5))
        send(writer, b"f2")  # the role is free now, but f1 still waits to be handed on
        sent.set()

    s = threading.Thread(target=sender)
    s.start()
    wait_until(lambda: writer.queued == 1, what="f1 to be queued")
    armed.set()
    gate.set()
    first.join(scaled(5))
    s.join(scaled(5))
    assert writer.drain(scaled(5)) == 0
    assert [bytes(f.payload) for f in decoded(writer.conn.wire())] == [b"first", b"f1", b"f2"]


def test_one_thread_streaming_hands_its_frames_to_the_background_writer(writer, monkeypatch) -> None:
    monkeypatch.setattr(fw, "STREAM_GAP", 60.0)  # every send counts as a run, whatever the machine's speed
    for i in range(200):
        send(writer, b"%d" % i)
    assert writer.drain(scaled(5)) == 0
    direct = [w for w in writer.conn.writes if w[1] == "frame"]
    assert len(direct) == fw.STREAM_RUN, "the first frames of a run are not written directly"
    assert writer.batches >= 1 and writer.batched_frames == 200 - fw.STREAM_RUN
    frames = decoded(writer.conn.wire())
    assert [bytes(f.payload) for f in frames] == [b"%d" % i for i in range(200)]
    assert [f.sequence for f in frames] == list(range(1, 201))


def test_a_reply_is_never_held_for_the_background_writer(writer, monkeypatch) -> None:
    monkeypatch.setattr(fw, "STREAM_GAP", 60.0)
    for i in range(50):
        writer.frames_arrived()  # request/response: the peer spoke before each send
        send(writer, b"reply %d" % i)
    assert all(call == "frame" for _ident, call, _data in writer.conn.writes)
    assert writer._thread is None


def test_the_reader_thread_writes_its_own_replies_and_does_not_wait_for_room(writer, monkeypatch) -> None:
    """A receiver replying from its delivery must keep reading: it never hands its frames to
    the background writer, and it does not wait for room below the reader's bound."""
    monkeypatch.setattr(fw, "STREAM_GAP", 60.0)
    writer.reader = threading.get_ident()  # as the core sets it around an inline delivery
    for i in range(20):
        send(writer, b"reply %d" % i)  # a burst of replies to one batch of requests
    assert all(call == "frame" for _ident, call, _data in writer.conn.writes), "the reader handed off"
    first, gate = held_write(writer, b"held")  # another thread writes (and blocks)
    for _ in range(fw.QUEUE_FRAMES + 8):
        send(writer, b"x")  # queued past QUEUE_FRAMES: a non-reader would wait here
    assert writer.queued > fw.QUEUE_FRAMES
    gate.set()
    first.join(scaled(5))
    assert writer.drain(scaled(5)) == 0
    writer.reader = None


def test_a_failed_write_of_queued_frames_closes_the_connection_and_later_sends_say_why(writer, caplog) -> None:
    writer.conn.fail_batches = CommError(CommError.TIMEOUT, "peer took nothing for 60 s")
    first, gate = held_write(writer, b"first")
    send(writer, b"queued")
    gate.set()
    first.join(scaled(5))
    wait_until(lambda: writer.conn.closed, what="the connection to be closed")
    with pytest.raises(CommError) as err:
        send(writer, b"after")
    assert err.value.code == CommError.CLOSED and "peer took nothing for 60 s" in err.value.message
    assert "1 frame(s) lost" in caplog.text


@pytest.mark.parametrize("size", [10, fw.SMALL_PAYLOAD + 1])
def test_after_a_failed_background_write_every_kind_of_send_says_why(writer, size) -> None:
    writer.conn.fail_batches = OSError("boom")
    first, gate = held_write(writer, b"first")
    send(writer, b"queued")
    gate.set()
    first.join(scaled(5))
    wait_until(lambda: writer.conn.closed, what="the connection to be closed")
    for attempt in (lambda: send(writer, b"y" * size), lambda: writer.exclusive().__enter__()):
        with pytest.raises(CommError) as err:
            attempt()
        assert "writing queued frames failed: OSError: boom" in err.value.message


def test_an_interrupt_after_taking_the_role_gives_it_back(writer, monkeypatch) -> None:
    real = fw.time.monotonic

    class Clock:
        calls = 0

        def monotonic(self) -> float:
            Clock.calls += 1
            if Clock.calls == 1:
                raise KeyboardInterrupt  # as a signal could, between taking the role and writing
            return real()

    monkeypatch.setattr(fw, "time", Clock())
    with pytest.raises(KeyboardInterrupt):
        send(writer, b"interrupted")
    assert not writer._role.locked(), "the role stayed taken"
    send(writer, b"next")
    send(writer, b"z" * (fw.SMALL_PAYLOAD + 1))
    assert [len(f.payload) for f in decoded(writer.conn.wire())] == [4, fw.SMALL_PAYLOAD + 1]


def test_a_frame_queued_as_closing_begins_is_written_before_its_send_returns(writer, monkeypatch) -> None:
    """begin_close() between the sender's state check and its append: a drain may already
    have looked, so the sender sees its own frame out before it returns."""
    session = writer.session
    first, gate = held_write(writer, b"first")
    real_check = session.check_data

    def check_then_close(headers, payload):
        checked = real_check(headers, payload)
        session.begin_close()  # the linger starts right here
        return checked

    monkeypatch.setattr(session, "check_data", check_then_close)
    written_at_return: list[int] = []
    b = threading.Thread(target=lambda: (send(writer, b"late"), written_at_return.append(len(writer.conn.writes))))
    b.start()
    b.join(0.2)
    assert b.is_alive(), "the send returned with its frame still queued while the connection closes"
    gate.set()
    first.join(scaled(5))
    b.join(scaled(5))
    assert written_at_return == [2]


def test_a_sender_waits_for_room_when_the_queue_is_full(writer) -> None:
    first, gate = held_write(writer, b"first")
    done = threading.Event()

    def flood() -> None:
        for _ in range(fw.QUEUE_FRAMES + 8):
            send(writer, b"x")
        done.set()

    t = threading.Thread(target=flood)
    t.start()
    wait_until(lambda: writer.queued > fw.QUEUE_FRAMES, what="the queue to fill")
    assert not done.wait(0.05), "a sender went on queuing past the bound"
    gate.set()
    t.join(scaled(10))
    assert done.is_set()
    assert writer.drain(scaled(5)) == 0


def test_a_large_frame_waits_its_turn_and_is_written_by_its_own_thread(writer) -> None:
    first, gate = held_write(writer, b"first")
    send(writer, b"small")  # queued
    big = threading.Thread(target=send, args=(writer, b"B" * (fw.SMALL_PAYLOAD + 1)))
    big.start()
    wait_until(lambda: writer._waiters, what="the large frame to wait for the role")
    late = threading.Thread(target=send, args=(writer, b"late"))
    late.start()
    gate.set()
    for t in (first, big, late):
        t.join(scaled(5))
    assert writer.drain(scaled(5)) == 0
    frames = decoded(writer.conn.wire())
    sizes = [len(f.payload) for f in frames]
    assert sizes == [5, 5, fw.SMALL_PAYLOAD + 1, 4], "the large frame was overtaken, or overtook"
    big_write = [w for w in writer.conn.writes if len(w[2]) > fw.SMALL_PAYLOAD]
    assert big_write[0][0] == big.ident
    assert [f.sequence for f in frames] == [1, 2, 3, 4]


def test_close_drops_what_is_queued_and_ends_the_background_writer(writer) -> None:
    first, gate = held_write(writer, b"first")
    send(writer, b"queued")
    writer.close()
    gate.set()
    first.join(scaled(5))
    wait_until(lambda: writer._thread is None, what="the background writer to end")
    assert writer.queued == 0
    with pytest.raises(CommError):
        send(writer, b"after close")


def test_a_driver_without_send_frames_writes_each_frame_in_turn() -> None:
    conn = WireConn(batches=False)
    w = FrameWriter(conn, open_session(), "plain")
    try:
        t, gate = held_write(w, b"first")
        second = threading.Thread(target=send, args=(w, b"second"))
        second.start()
        second.join(0.05)
        assert second.is_alive(), "without send_frames a sender waits for the write in progress"
        gate.set()
        t.join(scaled(5))
        second.join(scaled(5))
        assert [w_[1] for w_ in conn.writes] == ["frame", "frame"]
    finally:
        w.close()


def test_without_send_frames_a_waiting_sender_takes_the_role_as_a_lock_not_in_turn() -> None:
    """Handing the role over in turn made every sender wait for a thread switch (4 senders
    on ws and grpc fell to a sixth of their rate): a driver without send_frames has nothing
    queued to serve first, so waiting senders take the role as a lock is taken."""
    conn = WireConn(batches=False)
    w = FrameWriter(conn, open_session(), "plain")
    try:
        t, gate = held_write(w, b"first")
        waiting = [threading.Thread(target=send, args=(w, b"w%d" % i)) for i in range(3)]
        for x in waiting:
            x.start()
        wait_until(lambda: all(x.is_alive() for x in waiting), what="the senders to wait")
        assert not w._waiters, "senders lined up to be handed the role in turn"
        w.send_control(PONG)  # found the role taken: written first by the next holder
        gate.set()
        for x in (t, *waiting):
            x.join(scaled(5))
        assert [d for _i, _c, d in conn.writes][1] == PONG
        assert len(conn.writes) == 5
    finally:
        w.close()


def test_without_send_frames_a_sender_waiting_as_the_connection_closes_writes_nothing() -> None:
    # The plain role is a blocking lock: the waiting sender is let in when the write in
    # progress ends, and must then see the close rather than write.
    conn = WireConn(batches=False)
    w = FrameWriter(conn, open_session(), "plain")
    t, gate = held_write(w, b"first")
    result: list = []

    def second() -> None:
        try:
            send(w, b"second")
            result.append("sent")
        except CommError as e:
            result.append(e.code)

    s = threading.Thread(target=second)
    s.start()
    try:
        s.join(0.05)  # it waits for the write in progress (or, if slower, comes after close: the same result)
        w.close()
    finally:
        gate.set()
        t.join(scaled(5))
        s.join(scaled(5))
    assert not s.is_alive(), "the second sender never got the role"
    assert result == [CommError.CLOSED]
    assert [bytes(f.payload) for f in decoded(conn.wire())] == [b"first"]
    assert not w._role.locked()


def test_a_thread_handed_the_role_after_close_does_not_write(writer) -> None:
    hold, inside = threading.Event(), threading.Event()

    def holder() -> None:
        with writer.exclusive():
            inside.set()
            assert hold.wait(scaled(5))

    h = threading.Thread(target=holder)
    h.start()
    assert inside.wait(scaled(5))
    result: list = []

    def big() -> None:
        try:
            send(writer, b"B" * (fw.SMALL_PAYLOAD + 1))
            result.append("sent")
        except CommError as e:
            result.append(e.code)

    b = threading.Thread(target=big)
    b.start()
    wait_until(lambda: writer._waiters, what="the large frame to wait for the role")
    writer.close()
    hold.set()  # the holder lets go: the role is handed to the waiting thread
    h.join(scaled(5))
    b.join(scaled(5))
    assert result == [CommError.CLOSED] and writer.conn.writes == []


def test_an_interrupt_while_the_new_holder_writes_control_frames_gives_the_role_back() -> None:
    class Interrupting(WireConn):
        def send_frame(self, frame) -> None:
            if b"".join(bytes(b) for b in frame) == PONG:
                raise KeyboardInterrupt
            super().send_frame(frame)

    conn = Interrupting(batches=False)
    w = FrameWriter(conn, open_session(), "plain")
    try:
        w._role.acquire()  # a holder, mid-write
        w.send_control(PONG)  # queued: the next holder writes it first
        raised: list = []

        def sender() -> None:
            try:
                send(w, b"b")
            except BaseException as e:  # the interrupt is what is tested
                raised.append(type(e).__name__)

        t = threading.Thread(target=sender)
        t.start()
        wait_until(lambda: t.is_alive(), what="the sender to wait")
        w._role.release()  # the holder's first half of letting go: the waiting sender takes it
        t.join(scaled(5))
        assert raised == ["KeyboardInterrupt"] and not w._role.locked()
        send(w, b"after")
        assert conn.writes[-1][2].endswith(b"after")
    finally:
        w.close()


def test_concurrent_senders_keep_each_threads_order_and_the_numbers_follow_the_wire(monkeypatch) -> None:
    monkeypatch.setattr(fw, "STREAM_GAP", 1e-4)
    conn = WireConn()
    session = open_session()
    w = FrameWriter(conn, session, "busy")
    rng = random.Random(5)
    plans = {t: [rng.choice([3, 50, fw.SMALL_PAYLOAD + 10]) for _ in range(150)] for t in range(4)}

    def run(t: int) -> None:
        for i, size in enumerate(plans[t]):
            payload = bytes([t]) + i.to_bytes(2, "big") + b"z" * (size - 3)
            if i % 40 == 39:
                w.send_control(PONG)
            w.send_data(session, 7, t, None, payload)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(scaled(20))
        assert w.drain(scaled(10)) == 0
        data = conn.wire().replace(PONG, b"")
        frames = decoded(data)
        assert [f.sequence for f in frames] == list(range(1, 601))
        for t in range(4):
            mine = [int.from_bytes(bytes(f.payload[1:3]), "big") for f in frames if f.payload[0] == t]
            assert mine == list(range(150)), f"thread {t}'s frames were reordered"
    finally:
        w.close()


headers_st = st.none() | st.dictionaries(
    st.text(max_size=5), st.integers(-(2**63), 2**64 - 1) | st.text(max_size=5), max_size=3
)
payload_st = st.none() | st.binary(max_size=64) | st.binary(max_size=64).map(bytearray)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), headers_st, payload_st), max_size=8))
def test_check_then_number_encodes_as_data_frame_does(messages) -> None:
    a, b = open_session(), open_session()
    one = [b"".join(bytes(x) for x in a.data_frame(app, sid, h, p)) for app, sid, h, p in messages]
    items = [(app, sid, b.check_data(h, p)) for app, sid, h, p in messages]
    assert b"".join(bytes(x) for x in b.number_data(items)) == b"".join(one)


@pytest.mark.parametrize(
    ("headers", "payload", "says"),
    [({"x": 2**70}, b"", "msgpack"), (None, b"x" * 100, "exceeds the peer's maximum frame size")],
)
def test_check_data_refuses_what_data_frame_refuses(headers, payload, says) -> None:
    a, b = open_session(), open_session()
    a.send_limit = b.send_limit = 64
    with pytest.raises(CommError) as one:
        a.data_frame(1, 1, headers, payload)
    with pytest.raises(CommError) as other:
        b.check_data(headers, payload)
    assert says in one.value.message and one.value.message == other.value.message


def test_frame_type_of_queued_frames_is_data(writer, monkeypatch) -> None:
    monkeypatch.setattr(fw, "STREAM_GAP", 60.0)
    for _ in range(fw.STREAM_RUN + 3):
        send(writer, b"d")
    writer.drain(scaled(5))
    assert {f.type for f in decoded(writer.conn.wire())} == {FrameType.DATA}
