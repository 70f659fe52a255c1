"""One TCP connection: sends on the caller's thread, receives on a reactor pool thread."""

from __future__ import annotations

import itertools
import logging
import select
import socket
import threading
import time
from collections import deque

from sfm_core import CommError, Connection, ConnectorInfo, Mode
from sfm_core.frames import HANDSHAKE_MAX_FRAME, FrameDecoder

from .reactor import Reactor

log = logging.getLogger(__name__)

_IOV_MAX = 1024
_SMALL = 2048
# Reads per readiness event, until the socket is drained (EAGAIN) or this many: reading on
# while data keeps arriving saves a trip through epoll per chunk of a large frame.
_READS_PER_EVENT = 64
# While the thread that reads this connection is itself blocked sending on it (a receiver
# replying from process_message), it keeps reading up to this many bytes of frames, so two
# peers replying to each other at once do not deadlock on full socket buffers.
_READ_WHILE_SENDING = 64 * 1024 * 1024
# A frame this large is delivered as soon as it is complete.
_DELIVER_AT_ONCE = 256 * 1024
# How long a pool thread waits on a socket for the rest of a large frame before it goes back
# to serving other sockets (a stalled peer then costs no thread).
_LARGE_FRAME_WAIT_MS = 50
# A read after that wait that brings less than this is a peer trickling its frame: the
# thread gives the socket back to epoll (it would otherwise hold a shared pool thread for as
# long as the peer keeps trickling: four such peers froze a listener's every connection).
_TRICKLE = 4096


class TcpConnection(Connection):
    """A non-blocking socket served by a :class:`Reactor`.

    Sending: ``sendmsg`` of the frame's buffers straight from the sending thread (no copy, no
    hand-off); if the kernel takes only part, the thread waits for POLLOUT, up to
    ``send_timeout`` seconds without progress (each bit of progress is told to the frame
    receiver's ``bytes_sent``). Nothing is queued here, so ``send_urgent`` and ``drain`` keep the
    defaults: the core sends a control frame right after the send in progress. A frame that fails half-way closes the
    connection: the peer could not tell where the next frame starts. Receiving: ``recv_into``
    the decoder's buffers, so small frames arrive many per syscall and large ones land in a
    buffer sized from their prefix; the frames of one read go to the core in one
    ``process_frames`` call.
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
        self._decoder = FrameDecoder(max_frame_size, first_frame_max=HANDSHAKE_MAX_FRAME)
        self._send_timeout = send_timeout
        self._closing = False
        self._closed = False
        self._reader: int | None = None  # ident of the thread in on_readable, if any
        self._deferred: list = []  # frames read while that thread was blocked sending
        self._deferred_bytes = 0
        self._eof = False
        self._poller: select.poll | None = None
        self._trickling = False  # the last wait for a large frame brought a tiny chunk
        self._sends = 0  # frames sent so far, by any thread
        self._one_way = False  # the last on_readable round sent nothing
        try:
            self._peer = sock.getpeername()
            self._local = sock.getsockname()
        except OSError:
            self._peer = self._local = None

    def fileno(self) -> int:
        return -1 if self._closed else self._fd

    def watch_for_tls(self) -> None:
        """Look at the first bytes the peer sends, once (one ``MSG_PEEK``): a TLS record there
        means the two sides disagree on TLS, and the connection is closed at once with a log
        saying so (a ClientHello would otherwise read as a prefix claiming a ~369 MB frame).
        Nothing is added to later reads: the check replaces ``on_readable`` for one call."""
        self.on_readable = self._first_readable  # type: ignore[method-assign]

    def _first_readable(self) -> None:
        del self.on_readable  # from now on the class's own on_readable, with no check
        try:
            head = self.sock.recv(2, socket.MSG_PEEK)
        except BlockingIOError:
            self.watch_for_tls()  # woken with nothing to read: look again next time
            return
        except OSError:
            head = b""  # the read that follows reports it
        # A TLS record starts 0x16 (handshake) or 0x15 (alert), then 0x03 (the version); an SFM
        # first frame, at most 1 MiB, starts 0x00.
        if head[:1] in (b"\x16", b"\x15") and head[1:2] in (b"", b"\x03"):
            if self.connector is not None and self.connector.mode == Mode.ACTIVE:
                log.warning(
                    "connection %s: closing: the server %s answered in TLS on a plaintext tcp:// connection: "
                    "it is a TLS listener; connect with stcp:// or secure=true",
                    self.name,
                    _fmt(self._peer),
                )
            else:
                log.warning(
                    "connection %s from %s: closing: TLS ClientHello on a plaintext tcp listener: "
                    "the client uses stcp:// or secure=true?",
                    self.name,
                    _fmt(self._peer),
                )
            self._finish()
            return
        self.on_readable()

    def get_conn_properties(self) -> dict:
        """``peer_addr``/``local_addr`` as ``host:port`` strings."""
        return {"peer_addr": _fmt(self._peer), "local_addr": _fmt(self._local)}

    # -- sending (any thread; the core serialises sends per connection) --------------------

    def send_frame(self, frame) -> None:
        bufs = frame if isinstance(frame, list) else [frame]
        if self._closing:
            raise CommError(CommError.CLOSED, f"connection {self.name} to {_fmt(self._peer)} is closed")
        self._sends += 1
        total = sum(map(len, bufs))  # the core hands byte-format buffers: len() is bytes
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

    def send_frames(self, bufs: list, count: int) -> None:
        """Send ``count`` whole frames given as their buffers back to back (the core's
        ``send_messages``): one ``sendmsg`` of up to IOV_MAX buffers at a time,
        the payloads not copied; a batch of at most 2 KiB is joined for one ``send``."""
        if self._closing:
            raise CommError(CommError.CLOSED, f"connection {self.name} to {_fmt(self._peer)} is closed")
        self._sends += 1
        total = sum(map(len, bufs))
        try:
            if total <= _SMALL or len(bufs) == 1:
                data = bufs[0] if len(bufs) == 1 else b"".join(bufs)
                bufs = [data]
                sent = self.sock.send(data)
            else:
                sent = self.sock.sendmsg(bufs if len(bufs) <= _IOV_MAX else bufs[:_IOV_MAX])
        except BlockingIOError:
            sent = 0
        except OSError as e:
            self.close()
            raise CommError(CommError.CLOSED, f"connection {self.name} to {_fmt(self._peer)}: {e}") from None
        if sent != total:
            self._send_rest(bufs, sent)

    def _send_rest(self, bufs: list, sent: int) -> None:
        """Send the frame's remaining bytes, waiting for room. If that fails with part of the
        frame on the wire, the connection is closed: the peer could not find the next frame."""
        on_wire = sent > 0
        views: deque = deque()  # a batch may hold thousands of buffers: no list.pop(0)
        for b in bufs:
            mv = b if isinstance(b, memoryview) else memoryview(b)
            if sent >= mv.nbytes:
                sent -= mv.nbytes
                continue
            views.append(mv[sent:] if sent else mv)
            sent = 0
        reading_here = self._reader == threading.get_ident()
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT | (select.POLLIN if reading_here else 0))
        deadline = time.monotonic() + self._send_timeout
        try:
            while views:
                if self._closing:
                    raise CommError(CommError.CLOSED, f"connection {self.name} closed while sending")
                try:
                    n = self.sock.sendmsg(list(itertools.islice(views, _IOV_MAX)))
                except BlockingIOError:
                    n = 0
                except OSError as e:
                    raise CommError(CommError.CLOSED, f"connection {self.name} to {_fmt(self._peer)}: {e}") from None
                if n:
                    on_wire = True
                    deadline = time.monotonic() + self._send_timeout  # progress: the peer is alive
                    receiver = self.frame_receiver
                    if receiver is not None:
                        receiver.bytes_sent()  # so the core does not take a slow reader for a dead one
                while n and views:
                    first = views[0]
                    if n >= first.nbytes:
                        n -= first.nbytes
                        views.popleft()
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
                for _fd, events in poller.poll(min(wait, 1.0) * 1000):
                    if events & select.POLLIN and reading_here and not self._read_while_sending():
                        poller.modify(self._fd, select.POLLOUT)  # enough read ahead, or EOF
        except BaseException:
            if on_wire or self._closing:
                self.close()
            raise

    def _read_while_sending(self) -> bool:
        """Read frames for later delivery; False once reading should stop."""
        decoder = self._decoder
        try:
            while self._deferred_bytes < _READ_WHILE_SENDING:
                n = self.sock.recv_into(decoder.get_buffer())
                if n == 0:
                    self._eof = True
                    return False
                for frame in decoder.buffer_updated(n):
                    self._deferred.append(frame)
                    self._deferred_bytes += len(frame)
        except BlockingIOError:
            return True
        except CommError as e:
            log.warning("connection %s: closing, bad data from %s: %s", self.name, _fmt(self._peer), e.message)
            self.close()
        except OSError:
            self._eof = True
        return False

    # -- receiving (a reactor pool thread) -----------------------------------------------

    def on_readable(self) -> None:
        self._reader = threading.get_ident()
        sends = self._sends
        try:
            self._read_and_deliver()
            while self._deferred and not self._closing:
                frames, self._deferred, self._deferred_bytes = self._deferred, [], 0
                self._hand_over(frames)
            if self._eof:
                self._finish()
        finally:
            self._reader = None
            self._one_way = self._sends == sends

    def _read_and_deliver(self) -> None:
        decoder = self._decoder
        recv_into = self.sock.recv_into
        frames: list = []
        reads = 0
        waited = False
        try:
            while reads < _READS_PER_EVENT or decoder.in_large_frame:
                buf = decoder.get_buffer()
                try:
                    n = recv_into(buf)
                except BlockingIOError:
                    # In the middle of a large frame, wait here for the rest: cheaper than a
                    # trip through epoll (and maybe another pool thread) for every chunk.
                    if self._wait_for_rest():
                        waited = True
                        continue
                    break
                if waited or n >= _TRICKLE:  # else _note_read would change nothing: no call
                    waited = self._note_read(n, waited)
                reads += 1
                if n == 0:
                    self._at_eof()
                    break
                done = decoder.buffer_updated(n)
                large = decoder.in_large_frame
                if not large:
                    self._trickling = False
                if n < len(buf) and not large:
                    # A short read drained the socket: skip the recv that would say EAGAIN.
                    frames += done
                    break
                if done:
                    frames += done
                    if len(done[-1]) >= _DELIVER_AT_ONCE:
                        # Deliver a large frame before reading the next: its buffer is freed
                        # and reused warm, where a burst of them would each need fresh pages.
                        self._hand_over(frames)
                        frames = []
                        if self._deferred:
                            # A reply sent from that delivery read frames ahead: they come
                            # before anything read from here on, so deliver them first.
                            break
        except CommError as e:
            log.warning("connection %s: closing, bad data from %s: %s", self.name, _fmt(self._peer), e.message)
            self._eof = True
        except OSError as e:
            log.info("connection %s: %s", self.name, e)
            self._eof = True
        if frames:
            self._hand_over(frames)
        elif reads and self.frame_receiver is not None:
            self.frame_receiver.bytes_received()  # a large frame is still coming in

    def _wait_for_rest(self) -> bool:
        """The socket ran dry: in a large frame, wait here for more (unless the peer trickles);
        True if more came."""
        if not self._decoder.in_large_frame or self._trickling:
            return False
        if self.frame_receiver is not None:
            self.frame_receiver.bytes_received()  # alive, if slow
        return self._wait_readable()

    def _note_read(self, n: int, waited: bool) -> bool:
        """Mark a peer that sent under _TRICKLE after a wait as trickling (sticky until it
        sends a real chunk: a trickler waits in epoll); returns the new ``waited``."""
        if waited or n >= _TRICKLE:
            self._trickling = n < _TRICKLE
        return False

    def _at_eof(self) -> None:
        decoder = self._decoder
        if decoder.pending:
            log.warning(
                "connection %s: peer %s closed in the middle of a frame (%d bytes received of it)",
                self.name,
                _fmt(self._peer),
                decoder.pending,
            )
        self._eof = True

    def _wait_readable(self, timeout_ms: int = _LARGE_FRAME_WAIT_MS) -> bool:
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self._fd, select.POLLIN)
        return bool(self._poller.poll(timeout_ms)) and not self._closing

    def readable_now(self) -> bool:
        """True if more bytes (or EOF) are waiting: the reactor then keeps serving us (not a
        peer that trickles a large frame: it goes back to epoll)."""
        return not self._closed and not self._trickling and self._wait_readable(0)

    def wants_gather(self) -> bool:
        """True if the last round only took data in: a one-way stream, worth a short wait."""
        return self._one_way

    def _hand_over(self, frames: list) -> None:
        if frames:
            receiver = self.frame_receiver
            try:
                if receiver is not None:
                    receiver.process_frames(frames)  # what process_frames does, one call less
                else:
                    self.process_frames(frames)  # raises, naming the missing receiver
            except CommError as e:
                log.warning("connection %s: closing: %s", self.name, e)
                self.close()

    # -- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Shut the socket down; its pool thread then releases it (any thread)."""
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
