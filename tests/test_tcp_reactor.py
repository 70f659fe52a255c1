"""The TCP pool's keep-serving rule: when a thread holds on to a socket, and how long it waits."""

from __future__ import annotations

import time

from sfm_driver_tcp.reactor import Reactor


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
