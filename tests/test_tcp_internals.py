"""TCP driver internals: the pool's keep-serving rule, a send that stalls half-way, bytes_sent on progress."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from helpers import scaled
from sfm_driver_tcp.connection import TcpConnection
from sfm_driver_tcp.reactor import Reactor

from sfm_core import CommError
from sfm_core.driver import FrameReceiver


class Scripted:
    """A handler whose readable_now() answers from a script (then False)."""

    def __init__(self, *answers: bool, one_way: bool = True) -> None:
        self.answers = list(answers)
        self.asked_at: list[float] = []
        self.one_way = one_way

    def fileno(self) -> int:
        return -1

    def on_readable(self) -> None:
        pass

    def readable_now(self) -> bool:
        self.asked_at.append(time.monotonic())
        return self.answers.pop(0) if self.answers else False

    def wants_gather(self) -> bool:
        return self.one_way

    def on_reactor_stop(self) -> None:
        pass


def _reactor(gather: float) -> Reactor:
    r = Reactor("test", gather=gather)
    r.close()  # only the rule is under test; no descriptors are needed
    return r


def test_data_waiting_keeps_the_socket() -> None:
    assert _reactor(0.001)._more(Scripted(True), rounds=1)


def test_a_lone_message_is_handed_back_at_once() -> None:
    # First round ran dry: a request or a single message, which must not wait.
    h = Scripted(False, True)
    assert not _reactor(0.05)._more(h, rounds=1)
    assert len(h.asked_at) == 1


def test_a_stream_that_runs_dry_gets_one_short_wait() -> None:
    h = Scripted(False, True)
    t0 = time.monotonic()
    assert _reactor(0.02)._more(h, rounds=3)  # the data came during the wait
    assert h.asked_at[1] - t0 >= 0.02
    h = Scripted(False, False)
    assert not _reactor(0.001)._more(h, rounds=3)  # still dry after it: back to epoll
    assert len(h.asked_at) == 2


def test_gather_zero_never_waits() -> None:
    h = Scripted(False, True)
    assert not _reactor(0)._more(h, rounds=5)
    assert len(h.asked_at) == 1


def test_a_round_that_replied_never_waits() -> None:
    # Request/response: the next request comes only after the reply, and a sleep cannot be
    # cut short when it arrives.
    h = Scripted(False, True, one_way=False)
    assert not _reactor(0.05)._more(h, rounds=5)
    assert len(h.asked_at) == 1


class StalledSocket:
    """A socket whose peer takes ``first`` bytes of the next sendmsg, then nothing at all."""

    def __init__(self, first: int) -> None:
        self._pair = socket.socketpair()  # a real, always-writable descriptor for poll()
        self.first = first
        self.shut = False

    def fileno(self) -> int:
        return self._pair[0].fileno()

    def getpeername(self) -> tuple:
        return ("127.0.0.1", 9)

    getsockname = getpeername

    def send(self, data: bytes) -> int:
        raise BlockingIOError

    def sendmsg(self, bufs: list) -> int:
        n, self.first = self.first, 0
        if not n:
            raise BlockingIOError
        return n

    def shutdown(self, how: int) -> None:
        self.shut = True

    def close(self) -> None:
        for s in self._pair:
            s.close()


def _stalled_connection(first: int) -> tuple[StalledSocket, TcpConnection]:
    sock = StalledSocket(first)
    return sock, TcpConnection(sock, None, None, None, max_frame_size=1 << 20, send_timeout=0.2)


def test_a_send_that_times_out_with_part_of_the_frame_on_the_wire_closes_the_connection() -> None:
    sock, conn = _stalled_connection(first=10)  # the first send took nothing, the next 10 bytes
    try:
        with pytest.raises(CommError) as e:
            conn.send_frame([b"x" * 100])
        assert e.value.code == CommError.TIMEOUT
        assert sock.shut  # the peer could not tell where the next frame starts
        with pytest.raises(CommError, match="closed"):
            conn.send_frame([b"y" * 100])
    finally:
        sock.close()


def test_a_send_that_times_out_with_nothing_on_the_wire_keeps_the_connection() -> None:
    sock, conn = _stalled_connection(first=0)
    try:
        with pytest.raises(CommError) as e:
            conn.send_frame([b"x" * 100])
        assert e.value.code == CommError.TIMEOUT
        assert not sock.shut  # nothing of it was sent: the stream is still whole
    finally:
        sock.close()


class CountingReceiver(FrameReceiver):
    """Counts ``bytes_sent`` calls (the frames themselves are not under test)."""

    def __init__(self) -> None:
        self.sent = 0

    def process_frame(self, frame) -> None:
        pass

    def bytes_sent(self) -> None:
        self.sent += 1


def test_a_big_frame_to_a_slow_reader_tells_the_receiver_bytes_went_out() -> None:
    # The core counts bytes_sent() as a sign of life: a receiver that reads slowly is not dead.
    listener = socket.create_server(("127.0.0.1", 0))
    ours = socket.create_connection(listener.getsockname())
    theirs, _ = listener.accept()
    listener.close()
    size = 8 * 1024 * 1024
    got = bytearray()
    try:
        # Small socket buffers: the frame needs many rounds of waiting for room.
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        ours.setblocking(False)
        conn = TcpConnection(ours, None, None, None, max_frame_size=1 << 30, send_timeout=scaled(10))
        rx = CountingReceiver()
        conn.register_frame_receiver(rx)

        def read_slowly() -> None:
            theirs.settimeout(scaled(10))
            while len(got) < size:
                chunk = theirs.recv(16384)
                if not chunk:
                    return
                got.extend(chunk)
                time.sleep(0.0005)

        reader = threading.Thread(target=read_slowly)
        reader.start()
        try:
            conn.send_frame([b"h" * 16, memoryview(bytes(size - 16))])
        finally:
            reader.join(scaled(20))
        assert len(got) == size
        assert rx.sent > 0
    finally:
        ours.close()
        theirs.close()
