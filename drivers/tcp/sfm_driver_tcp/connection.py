"""One TCP connection: sends on the caller's thread, receives on the reactor's thread."""

from __future__ import annotations

import logging
import select
import socket
import time

from sfm_core import CommError, Connection, ConnectorInfo
from sfm_core.frames import FrameDecoder

from .reactor import Reactor

log = logging.getLogger(__name__)

_IOV_MAX = 1024
_SMALL = 2048
# Reads per readiness event, until the socket is drained (EAGAIN) or this many: reading on
# while data keeps arriving saves a trip through epoll per chunk of a large frame.
_READS_PER_EVENT = 64


class TcpConnection(Connection):
    """A non-blocking socket served by a :class:`Reactor`.

    Sending: ``sendmsg`` of the frame's buffers straight from the sending thread (no copy, no
    hand-off); if the kernel takes only part, the thread waits for POLLOUT up to
    ``send_timeout`` seconds. Receiving: ``recv_into`` the decoder's buffers, so small frames
    arrive many per syscall and large ones land in a buffer sized from their prefix; the
    frames of one read go to the core in one ``process_frames`` call.
    """

    # Served by one EPOLLONESHOT pool thread at a time: the core may deliver right there.
    inline_delivery = True

    def __init__(
        self,
        sock: socket.socket,
        connector: ConnectorInfo | None,
        reactor: Reactor,
        driver: object,
        *,
        max_frame_size: int,
        send_timeout: float,
    ) -> None:
        super().__init__(connector)
        self.sock = sock
        self._fd = sock.fileno()
        self._reactor = reactor
        self._driver = driver
        self._decoder = FrameDecoder(max_frame_size)
        self._send_timeout = send_timeout
        self._closing = False
        self._closed = False
        try:
            self._peer = sock.getpeername()
            self._local = sock.getsockname()
        except OSError:
            self._peer = self._local = None

    def fileno(self) -> int:
        return -1 if self._closed else self._fd

    def get_conn_properties(self) -> dict:
        """``peer_addr``/``local_addr`` as ``host:port`` strings."""
        return {"peer_addr": _fmt(self._peer), "local_addr": _fmt(self._local)}

    # -- sending (any thread; the core serialises sends per connection) --------------------

    def send_frame(self, frame) -> None:
        bufs = frame if isinstance(frame, list) else [frame]
        if self._closing:
            raise CommError(CommError.CLOSED, f"connection {self.name} to {_fmt(self._peer)} is closed")
        total = sum(map(len, bufs))
        try:
            if total <= _SMALL:
                # For a small frame one contiguous send is cheaper than building an iovec.
                sent = self.sock.send(b"".join(bufs))
            else:
                sent = self.sock.sendmsg(bufs) if len(bufs) <= _IOV_MAX else 0
        except BlockingIOError:
            sent = 0
        except OSError as e:
            self.close()
            raise CommError(CommError.CLOSED, f"connection {self.name} to {_fmt(self._peer)}: {e}") from None
        if sent != total:
            self._send_rest(bufs, sent)

    def _send_rest(self, bufs: list, sent: int) -> None:
        views = []
        for b in bufs:
            mv = memoryview(b).cast("B") if not isinstance(b, memoryview) or b.format != "B" else b
            if sent >= mv.nbytes:
                sent -= mv.nbytes
                continue
            views.append(mv[sent:] if sent else mv)
            sent = 0
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        deadline = time.monotonic() + self._send_timeout
        while views:
            if self._closing:
                raise CommError(CommError.CLOSED, f"connection {self.name} closed while sending")
            try:
                n = self.sock.sendmsg(views[:_IOV_MAX])
            except BlockingIOError:
                n = 0
            except OSError as e:
                self.close()
                raise CommError(CommError.CLOSED, f"connection {self.name} to {_fmt(self._peer)}: {e}") from None
            while n and views:
                first = views[0]
                if n >= first.nbytes:
                    n -= first.nbytes
                    views.pop(0)
                else:
                    views[0] = first[n:]
                    n = 0
            if not views:
                return
            wait = deadline - time.monotonic()
            if wait <= 0:
                raise CommError(
                    CommError.TIMEOUT,
                    f"connection {self.name} to {_fmt(self._peer)}: peer took nothing for {self._send_timeout} s",
                )
            poller.poll(min(wait, 1.0) * 1000)

    # -- receiving (reactor thread) --------------------------------------------------------

    def on_readable(self) -> None:
        decoder = self._decoder
        recv_into = self.sock.recv_into
        frames: list = []
        try:
            for _ in range(_READS_PER_EVENT):
                n = recv_into(decoder.get_buffer())
                if n == 0:
                    if decoder.pending:
                        log.warning(
                            "connection %s: peer %s closed in the middle of a frame (%d bytes received of it)",
                            self.name,
                            _fmt(self._peer),
                            decoder.pending,
                        )
                    self._hand_over(frames)
                    self._finish()
                    return
                frames += decoder.buffer_updated(n)
        except BlockingIOError:
            pass
        except CommError as e:
            log.warning("connection %s: closing, bad data from %s: %s", self.name, _fmt(self._peer), e.message)
            self._hand_over(frames)
            self._finish()
            return
        except OSError as e:
            log.info("connection %s: %s", self.name, e)
            self._hand_over(frames)
            self._finish()
            return
        self._hand_over(frames)

    def _hand_over(self, frames: list) -> None:
        if frames:
            try:
                self.process_frames(frames)
            except CommError as e:
                log.warning("connection %s: closing: %s", self.name, e)
                self.close()

    # -- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Shut the socket down; the reactor thread then releases it (any thread)."""
        if self._closing:
            return
        self._closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def on_reactor_stop(self) -> None:
        self._finish()

    def _finish(self) -> None:
        if self._closed:
            return
        self._closing = True
        self._reactor.remove(self, self._fd)
        self._closed = True
        self.sock.close()
        self._driver.remove_connection(self)


def _fmt(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = addr[0]
        return f"[{host}]:{addr[1]}" if ":" in str(host) else f"{host}:{addr[1]}"
    return str(addr)
