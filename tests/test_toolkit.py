"""The driver toolkit of the core (docs/plugins.md, "Toolkit"): host bracketing
(sfm_core.url.host_port), the bounded send queue (sfm_core.send_queue), whole-frame checks for
message transports (sfm_core.frame_check) and the asyncio driver base with wait_closed()
(sfm_core.aio_driver)."""

from __future__ import annotations

import asyncio
import struct
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sfm_core import CommError
from sfm_core.aio_driver import AioConnection, AioDriver
from sfm_core.frame_check import MessageFrames
from sfm_core.frames import MAX_FRAME_SIZE, FrameType, decode_frame, encode_frame
from sfm_core.send_queue import SendQueue
from sfm_core.url import format_url, host_port

# -- host_port -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("127.0.0.1", 80), "127.0.0.1:80"),
        (("::1", 80), "[::1]:80"),
        (("[::1]", 80), "[::1]:80"),
        (("fe80::1%eth0", 5), "[fe80::1%eth0]:5"),
        (("example.org", 443), "example.org:443"),
        (("::1",), "[::1]"),
        (("localhost",), "localhost"),
        ((("10.0.0.1", 9),), "10.0.0.1:9"),
        ((("::1", 9, 0, 0),), "[::1]:9"),
        ((None,), "None"),
        ((("x",),), "('x',)"),
    ],
)
def test_host_port_brackets_ipv6_hosts_only(args, expected) -> None:
    assert host_port(*args) == expected


def test_format_url_uses_the_same_bracketing() -> None:
    assert format_url("ws", "::1", 8, "/f3") == "ws://[::1]:8/f3"
    assert format_url("tcp", "[::1]", 8) == "tcp://[::1]:8"
    assert format_url("grpc", "h", 1) == "grpc://h:1"


# -- SendQueue -------------------------------------------------------------------------------


def _blocked_put(q: SendQueue, item, size: int, timeout: float | None = None) -> tuple[threading.Thread, list]:
    """A thread that puts ``item``; returns it and a list that gets the result or the error."""
    out: list = []

    def run() -> None:
        try:
            out.append(q.put(item, size, timeout))
        except CommError as e:
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _wait_for_waiter(q: SendQueue) -> None:
    deadline = time.monotonic() + 5
    while not q._waiters:
        assert time.monotonic() < deadline, "the sender never blocked"
        time.sleep(0.001)


def test_put_wakes_the_writer_once_per_idle_period() -> None:
    q: SendQueue = SendQueue(100)
    assert q.put("a", 10) is True  # the writer starts idle: wake it
    assert q.put("b", 10) is False  # already woken
    batch = q.take()
    assert list(batch.items) == ["a", "b"] and batch.nbytes == 20
    assert q.put("c", 10) is False  # the writer took something and comes back by itself
    q.take()
    assert not q.take()  # nothing: the writer goes idle
    assert q.put("d", 10) is True
    q.take(idle=True)  # a writer that does not come back on its own
    assert q.put_urgent("u") is True


def test_a_writer_that_starts_by_itself_is_not_woken() -> None:
    q: SendQueue = SendQueue(100, idle=False)
    assert q.put("a", 1) is False
    assert q.take() and not q.take()
    assert q.put("b", 1) is True


def test_one_item_always_goes_into_an_empty_queue() -> None:
    q: SendQueue = SendQueue(10, timeout=0.01)
    q.put("big", 1000)
    assert q.queued_bytes == 1000
    with pytest.raises(CommError) as e:
        q.put("x", 1)
    assert e.value.code == CommError.TIMEOUT


def test_put_blocks_above_high_water_until_the_writer_releases() -> None:
    q: SendQueue = SendQueue(100)
    q.put("a", 60)
    t, out = _blocked_put(q, "b", 60)
    _wait_for_waiter(q)
    assert not out
    batch = q.take(release=True)
    assert batch.waiters and list(batch.items) == ["a"]
    t.join(5)
    assert out == [False] or out == [True]
    assert list(q.items) == ["b"] and q.queued_bytes == 60


def test_done_releases_a_batch_written_later() -> None:
    q: SendQueue = SendQueue(100)
    q.put("a", 60)
    batch = q.take()
    assert q.queued_bytes == 60 and q.pending() == 1  # being written
    t, out = _blocked_put(q, "b", 60)
    _wait_for_waiter(q)
    assert q.done(batch) is True  # a sender was waiting: the peer is slow, not dead
    t.join(5)
    assert out and not isinstance(out[0], Exception)
    assert q.queued_bytes == 60 and q.pending() == 1


def test_timeout_names_the_connection() -> None:
    q: SendQueue = SendQueue(10, timeout=0.05, describe=lambda: "connection CN1 to 1.2.3.4:5")
    q.put("a", 10)
    start = time.monotonic()
    with pytest.raises(CommError) as e:
        q.put("b", 1)
    assert time.monotonic() - start >= 0.04
    assert e.value.code == CommError.TIMEOUT
    assert "connection CN1 to 1.2.3.4:5" in str(e.value) and "0.05 s" in str(e.value)
    with pytest.raises(CommError) as e:
        q.put("b", 1, timeout=0.01)  # the call's own timeout
    assert "0.01 s" in str(e.value)


def test_close_wakes_blocked_senders_with_closed_and_keeps_the_queue() -> None:
    q: SendQueue = SendQueue(10, describe="connection CN2")
    q.put("a", 10)
    t, out = _blocked_put(q, "b", 10)
    _wait_for_waiter(q)
    q.close()
    t.join(5)
    assert isinstance(out[0], CommError) and out[0].code == CommError.CLOSED and "CN2" in str(out[0])
    assert q.closed and list(q.items) == ["a"]  # the writer may still finish it
    with pytest.raises(CommError) as e:
        q.put("c", 1)
    assert e.value.code == CommError.CLOSED
    with pytest.raises(CommError):
        q.put_urgent("u")


def test_drop_forgets_the_queue_and_counts_it() -> None:
    q: SendQueue = SendQueue(100)
    q.put("a", 10)
    q.put("b", 20)
    q.put_urgent("u")
    assert q.drop(extra=1) == (2, 30, 1)
    assert q.dropped == 3 and q.queued_bytes == 0 and not q.items and q.closed
    assert q.drain(1.0) == 3  # once closed drain() answers what was dropped


def test_urgent_items_come_first_and_do_not_count() -> None:
    q: SendQueue = SendQueue(10)
    q.put("a", 10)
    assert q.put_urgent("ping") is False  # the writer is already woken by "a"
    assert q.queued_bytes == 10
    batch = q.take(data=False, release=True)  # writing paused: only the control frames
    assert list(batch.urgent) == ["ping"] and not batch.items
    batch = q.take(release=True)
    assert not batch.urgent and list(batch.items) == ["a"]


def test_take_batches_by_measure() -> None:
    q: SendQueue = SendQueue(1000)
    for i, size in enumerate([30, 30, 30, 50, 10]):
        q.put((i, size), size + 5)  # 5 bytes of envelope each
    first = q.take(100, measure=lambda item: item[1])
    assert [i for i, _ in first.items] == [0, 1, 2] and first.nbytes == 105
    q.done(first)
    assert [i for i, _ in q.take(0).items] == [3]  # 0: one item
    q.put((5, 500), 505)
    # The first item always goes, even alone over the limit.
    assert [i for i, _ in q.take(5).items] == [4]
    assert [i for i, _ in q.take(None).items] == [5]


def test_drain_waits_until_the_writer_is_done() -> None:
    q: SendQueue = SendQueue(100)
    q.put("a", 1)
    assert q.drain(0.01) == 1
    batch = q.take()
    threading.Timer(0.05, q.done, (batch,)).start()
    assert q.drain(5.0) == 0


def test_on_the_loop_thread_a_full_queue_raises_at_once() -> None:
    loop = asyncio.new_event_loop()
    try:
        q: SendQueue = SendQueue(10, timeout=30, loop=loop, describe="connection CN3")
        q.put("a", 10)

        async def put_on_loop() -> CommError | None:
            try:
                q.put("b", 10)
            except CommError as e:
                return e
            return None

        start = time.monotonic()
        err = loop.run_until_complete(put_on_loop())
        assert err is not None and err.code == CommError.TIMEOUT and "event loop thread" in str(err)
        assert time.monotonic() - start < 5

        async def drain_on_loop() -> int:
            return q.drain(30)

        assert loop.run_until_complete(drain_on_loop()) == 1  # does not wait either
        assert time.monotonic() - start < 5
    finally:
        loop.close()


def test_many_senders_one_writer_keep_order_and_the_bound() -> None:
    high_water, size, senders, each = 1000, 100, 4, 500
    q: SendQueue = SendQueue(high_water, timeout=10)
    wake = threading.Event()
    peak = [0]

    def send(n: int) -> None:
        for i in range(each):
            if q.put((n, i), size):
                wake.set()

    threads = [threading.Thread(target=send, args=(n,)) for n in range(senders)]
    for t in threads:
        t.start()
    got: dict[int, list] = {n: [] for n in range(senders)}
    total = 0
    while total < senders * each:
        peak[0] = max(peak[0], q.queued_bytes)
        batch = q.take(300)
        if not batch:
            wake.wait(0.05)
            wake.clear()
            continue
        for n, i in batch.items:
            got[n].append(i)
        total += len(batch.items)
        q.done(batch)
    for t in threads:
        t.join(5)
    assert all(got[n] == list(range(each)) for n in range(senders))
    assert peak[0] <= high_water + size
    assert q.pending() == 0 and q.queued_bytes == 0


# -- MessageFrames ---------------------------------------------------------------------------


def _frame(payload: bytes, headers: dict | None = None) -> bytes:
    return b"".join(encode_frame(FrameType.DATA, 1, 7, headers, payload))


def _bad(fn, *args) -> str:
    with pytest.raises(CommError) as e:
        fn(*args)
    assert e.value.code == CommError.BAD_DATA
    return e.value.message


def test_one_frame_is_the_message_itself() -> None:
    frame = _frame(b"x" * 10)
    check = MessageFrames(MAX_FRAME_SIZE, what="the WebSocket message")
    assert check.one(frame) is frame
    assert check.split(frame) == [frame]


def test_the_same_words_for_every_driver() -> None:
    check = MessageFrames(1000, what="Frame.data", first_frame_max=None)
    assert _bad(check.one, b"\x00" * 5) == "Frame.data of 5 bytes is shorter than the 16-byte SFM prefix"
    lying = bytearray(_frame(b"x" * 100))
    struct.pack_into(">I", lying, 0, 50)
    assert _bad(check.one, bytes(lying)) == f"frame length field says 50 bytes but Frame.data has {len(lying)}"
    assert _bad(check.split, bytes(lying)) == f"frame length field says 50 bytes but Frame.data has {len(lying)}"
    assert "exceeds the maximum frame size of 1000 bytes" in _bad(check.one, _frame(b"x" * 2000))
    bad_header = bytearray(_frame(b"x" * 10))
    struct.pack_into(">H", bad_header, 4, 500)
    assert "header_len 500 exceeds" in _bad(check.one, bytes(bad_header))


def test_the_first_frame_limit_holds_for_the_first_frame_only() -> None:
    big = _frame(b"x" * 2000)
    with pytest.raises(CommError):
        MessageFrames(10_000, first_frame_max=1000).one(big)
    check = MessageFrames(10_000, first_frame_max=1000)
    check.one(_frame(b"hello"))
    assert check.one(big) is big
    # In a batch, the first frame of the first message.
    check = MessageFrames(10_000, first_frame_max=1000)
    assert "exceeds the maximum frame size of 1000" in _bad(check.split, big + _frame(b"y"), True)
    check = MessageFrames(10_000, first_frame_max=1000)
    assert len(check.split(_frame(b"y") + big, True)) == 2


def test_a_batch_is_refused_unless_agreed() -> None:
    two = _frame(b"a") + _frame(b"bb")
    check = MessageFrames(MAX_FRAME_SIZE, what="Frame.data")
    assert "frame length field says" in _bad(check.split, two)
    frames = check.split(memoryview(two), True)
    assert [bytes(f) for f in frames] == [_frame(b"a"), _frame(b"bb")]
    assert all(isinstance(f, memoryview) for f in frames)


def test_a_broken_batch_says_where() -> None:
    check = MessageFrames(MAX_FRAME_SIZE, what="Frame.data")
    first = _frame(b"a")
    assert _bad(check.split, first + b"\x00" * 5, True) == "batched Frame.data ends with 5 bytes, not a whole frame"
    cut = first + _frame(b"b" * 10)[:-3]
    message = _bad(check.split, cut, True)
    assert message.startswith(f"batched frame at offset {len(first)} says") and "left in Frame.data" in message


_frames = st.lists(
    st.tuples(
        st.binary(max_size=200),
        st.none() | st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**63 - 1), max_size=3),
    ),
    min_size=1,
    max_size=6,
).map(lambda fs: [_frame(p, h) for p, h in fs])


@given(_frames)
def test_whole_frames_split_back_to_the_frames(frames: list[bytes]) -> None:
    check = MessageFrames(MAX_FRAME_SIZE)
    out = check.split(b"".join(frames), batch=True)
    assert [bytes(f) for f in out] == frames
    for frame in frames:
        assert MessageFrames(MAX_FRAME_SIZE).one(frame) == frame
        assert decode_frame(frame).type == FrameType.DATA


@given(_frames, st.data())
def test_any_change_to_a_length_or_the_size_is_refused_or_still_whole_frames(frames: list[bytes], data) -> None:
    message = bytearray(b"".join(frames))
    how = data.draw(st.sampled_from(["cut", "extend", "length", "header_len"]))
    if how == "cut":
        del message[data.draw(st.integers(0, len(message) - 1)) :]
    elif how == "extend":
        message += data.draw(st.binary(min_size=1, max_size=40))
    else:
        offsets = [0]
        for f in frames[:-1]:
            offsets.append(offsets[-1] + len(f))
        at = data.draw(st.sampled_from(offsets))
        if how == "length":
            struct.pack_into(">I", message, at, data.draw(st.integers(0, 2**32 - 1)))
        else:
            struct.pack_into(">H", message, at + 4, data.draw(st.integers(0, 0xFFFF)))
    try:
        out = MessageFrames(MAX_FRAME_SIZE).split(bytes(message), batch=True)
    except CommError as e:
        assert e.code == CommError.BAD_DATA and e.message
        return
    # Accepted: then it is whole frames back to back, each with a sane prefix, covering it all.
    assert sum(len(f) for f in out) == len(message)
    for f in out:
        length, header_len = struct.unpack_from(">IH", f)
        assert length == len(f) and 16 + header_len <= length


# -- AioDriver and AioConnection -------------------------------------------------------------


class _Conn(AioConnection):
    def __init__(self) -> None:
        super().__init__(None)
        self.closes = 0

    def get_conn_properties(self) -> dict:
        return {}

    def send_frame(self, frame) -> None:
        pass

    def close(self) -> None:
        self.closes += 1
        self.set_closed()


class _Driver(AioDriver):
    DRIVER_NAME = "toy driver"

    def __init__(self) -> None:
        super().__init__()
        self.tasks: set = set()

    @staticmethod
    def supported_transports() -> list[str]:
        return ["toy"]

    @staticmethod
    def capabilities() -> dict:
        return {}

    def listen(self, connector) -> None:
        self.acquire()
        try:
            self.wait_stopping()
        finally:
            self.release()

    def connect(self, connector) -> None:
        raise NotImplementedError

    def shutdown_on_loop(self) -> None:
        for task in self.tasks:
            task.cancel()
        super().shutdown_on_loop()


def test_wait_closed() -> None:
    conn = _Conn()
    assert not conn.closed and conn.wait_closed(0.01) is False
    threading.Timer(0.02, conn.close).start()
    assert conn.wait_closed(5) is True and conn.closed


def test_shutdown_wakes_listen_and_releases_the_loop() -> None:
    driver = _Driver()
    t = threading.Thread(target=driver.listen, args=(None,))
    t.start()
    deadline = time.monotonic() + 5
    while driver.loop_thread is None:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert not driver.stopping
    driver.shutdown()
    t.join(5)
    assert not t.is_alive() and driver.stopping and driver.loop_thread is None


def test_run_returns_raises_times_out_and_is_refused_after_shutdown() -> None:
    driver = _Driver()
    driver.acquire()
    try:

        async def value() -> int:
            return 42

        async def fails() -> None:
            raise CommError(CommError.BAD_CONFIG, "no")

        cancelled = threading.Event()

        async def forever() -> None:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        assert driver.run(value(), 5) == 42
        with pytest.raises(CommError) as e:
            driver.run(fails(), 5)
        assert e.value.code == CommError.BAD_CONFIG  # the coroutine's own error as it is
        with pytest.raises(CommError) as e:
            driver.run(forever(), 0.05, timeout_message="toy: no connection to [::1]:5 after 0.05 s")
        assert e.value.code == CommError.TIMEOUT and "[::1]:5" in str(e.value)
        assert cancelled.wait(5)  # a timed-out coroutine is cancelled on the loop

        # shutdown cancels what the driver has in progress (shutdown_on_loop): CLOSED.
        async def tracked() -> None:
            driver.tasks.add(asyncio.current_task())
            await asyncio.sleep(60)

        out: list = []

        def connect() -> None:
            try:
                driver.run(tracked(), 30)
            except CommError as err:
                out.append(err)

        t = threading.Thread(target=connect)
        t.start()
        deadline = time.monotonic() + 5
        while not driver.tasks:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        live = _Conn()
        driver._live.add(live)
        driver.shutdown()
        t.join(5)
        assert out and out[0].code == CommError.CLOSED and "toy driver is shut down" in str(out[0])
        assert live.wait_closed(5) and live.closes == 1  # shutdown_on_loop closed it
        coro = value()
        with pytest.raises(CommError) as e:
            driver.run(coro, 5)
        assert e.value.code == CommError.CLOSED
        assert coro.cr_frame is None  # closed, never run (no "never awaited" warning)
        with pytest.raises(CommError):
            driver.check_running()
    finally:
        driver.release()
