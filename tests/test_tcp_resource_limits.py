"""A TCP listener out of file descriptors: it says so, keeps its peers, and recovers."""

from __future__ import annotations

import signal
import sys

import psutil
import pytest
from helpers import RawPeer, scaled, serving, wait_until

from sfm_core import FrameType

FD_LIMIT = 24  # the server process's soft RLIMIT_NOFILE: a handful of connections fit


# The child lowers its own limit: a preexec_fn would fork this process, and gRPC's fork
# handlers (when loaded by earlier tests) then open descriptors here.
_SERVE_STARVED = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, ({FD_LIMIT}, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from sfm_core.cli import main
sys.exit(main(["serve", "tcp://127.0.0.1:0", "--name", "starved"]))
"""


@pytest.fixture
def starved_server():
    """``sfm serve`` in a process that can open only FD_LIMIT files; yields (proc, url)."""
    with serving([sys.executable, "-c", _SERVE_STARVED]) as served:
        yield served


def _answered(peer: RawPeer, timeout: float) -> bool:
    try:
        return peer.read_frame(timeout).type == FrameType.READY
    except TimeoutError:
        return False


def _accepted(server: psutil.Process, peers: list[RawPeer]) -> list[RawPeer]:
    """The peers whose connection the server process has accepted (it holds a socket to them)."""
    remote = {c.raddr for c in server.net_connections("tcp") if c.raddr}
    return [p for p in peers if p.sock.getsockname() in remote]


def test_a_listener_out_of_descriptors_keeps_its_peers_and_recovers(starved_server) -> None:
    proc, url = starved_server
    server = psutil.Process(proc.pid)
    peers = [RawPeer(url) for _ in range(FD_LIMIT + 6)]  # the kernel queues what it can't accept
    try:
        for i, peer in enumerate(peers):
            peer.hello(f"site-{i}")
        # Every descriptor in use: the server has accepted all it can; the rest wait in the queue.
        wait_until(lambda: server.num_fds() >= FD_LIMIT, what=f"the server to use all {FD_LIMIT} descriptors")
        answered = _accepted(server, peers)
        waiting = [p for p in peers if p not in answered]
        assert answered and waiting, f"{len(answered)} of {len(peers)} accepted under a limit of {FD_LIMIT} files"
        assert all(_answered(p, 5.0) for p in answered)  # each accepted peer gets its READY
        # The served peers are unaffected: they still get answers (a PING gets its PONG).
        answered[0].send_frame(FrameType.PING, payload=b"\xc0")  # msgpack nil, as NVFlare sends
        assert answered[0].read_frame(5).type == FrameType.PONG
        # Freeing descriptors lets the listener accept the queued peers: nobody is lost.
        for peer in answered:
            peer.close()
        assert all(_answered(p, 10.0) for p in waiting)
        assert proc.poll() is None
    finally:
        for peer in peers:
            peer.close()
    proc.send_signal(signal.SIGTERM)
    proc.wait(scaled(10))
    err = proc.stderr.read()
    assert "accept failed" in err and "Too many open files" in err, err
    assert err.count("accept failed") <= 3, "the warning is rate-limited, not one per retry"


def test_peers_trickling_large_handshakes_do_not_hold_the_pool() -> None:
    """Four peers each announce a 1 MiB HELLO and send it a byte every 20 ms, forever: the
    listener's four pool threads must still serve a good client (they used to be pinned)."""
    import socket
    import threading

    from helpers import Collector, scaled, wait_until

    from sfm_core import ConnManager, Endpoint, Mode
    from sfm_core.frames import PREFIX

    server = ConnManager(Endpoint("server"))
    got = Collector()
    server.register_message_receiver(1, got)
    handle = server.add_connector("tcp://127.0.0.1:0?io_threads=4", {}, Mode.PASSIVE)
    server.start()
    url = server.wait_listening(handle, scaled(10))
    port = int(url.rsplit(":", 1)[1])
    stop = threading.Event()
    tricklers = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]

    def trickle() -> None:
        for s in tricklers:  # "a 1 MiB HELLO follows", then one byte at a time
            s.sendall(PREFIX.pack(1 << 20, 0, 4, 0, 0, 0, 1, 1))
        while not stop.wait(0.02):
            for s in tricklers:
                try:
                    s.send(b"\x00")
                except OSError:
                    pass

    t = threading.Thread(target=trickle)
    t.start()
    client = ConnManager(Endpoint("site-1"))
    try:
        wait_until(lambda: len(server.sfm_conns) == 4, what="the tricklers to be accepted")
        client.add_connector(url, {}, Mode.ACTIVE)
        client.start()
        peer = client.wait_for_endpoint("server", timeout=scaled(10))
        for i in range(20):
            client.send_message(peer, 1, None, str(i).encode())
        assert [m[3] for m in got.wait_for(20, timeout=10)] == [str(i).encode() for i in range(20)]
    finally:
        stop.set()
        t.join(scaled(5))
        client.stop(linger=0)
        server.stop(linger=0)
        for s in tricklers:
            s.close()
