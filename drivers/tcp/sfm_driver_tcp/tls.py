"""TLS on a TCP connection (``stcp://``, or ``tcp://`` with ``secure=true``), sans-I/O.

The reactor keeps owning a plain non-blocking socket: OpenSSL works on two memory BIOs
(:meth:`ssl.SSLContext.wrap_bio`). Received bytes go from the socket into the incoming BIO
and are decrypted straight into the :class:`FrameDecoder`'s buffers; a frame to send is
encrypted into the outgoing BIO, whose bytes go to the socket on the sender's thread as for
plain TCP (waiting on POLLOUT, with ``send_timeout``). The TLS handshake is driven by the
events of the socket, so a silent or trickling peer holds no pool thread, and it has its own
deadline (``tls_handshake_timeout``, :class:`HandshakeTimer`). Only once it is complete is the
connection handed to the core (``add_connection``), whose SFM handshake then runs over TLS.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import select
import socket
import ssl
import threading
import time

from sfm_core import CommError, ConnectorInfo
from sfm_core.tls import TlsSettings, peer_properties

from .connection import _DELIVER_AT_ONCE, _READ_WHILE_SENDING, _READS_PER_EVENT, TcpConnection, _fmt
from .reactor import Reactor

log = logging.getLogger(__name__)

# Plaintext encrypted and sent per round of a large frame: big enough that the Python work
# per round is small against the cipher's, small enough to stay in the caches.
_CHUNK = 256 * 1024
# Up to this size the frame's buffers are joined and sent as one TLS record.
_ONE_RECORD = 16 * 1024
_RAW_SIZE = 256 * 1024
# What a TLS listener says to a peer whose first bytes are not TLS: a fatal protocol_version
# alert, which an sfm plaintext client recognises (and NVFlare's reads as a cut frame).
_NOT_TLS_ALERT = b"\x15\x03\x03\x00\x02\x02\x46"
_HANDSHAKE_RECORD = 0x16
_ALERT_RECORD = 0x15

_local = threading.local()


def _raw_buffer() -> memoryview:
    """This thread's buffer for ciphertext on its way from the socket to the incoming BIO.

    Its bytes are copied into the BIO right after the read, so one buffer per thread serves
    every connection the thread reads, and an idle TLS connection costs no receive buffer."""
    view = getattr(_local, "raw", None)
    if view is None:
        view = _local.raw = memoryview(bytearray(_RAW_SIZE))
    return view


class HandshakeFailed(Exception):
    """A TLS handshake that cannot complete; the message says why, for the log."""


class TlsTcpConnection(TcpConnection):
    """A :class:`TcpConnection` that speaks TLS through memory BIOs.

    The reading thread decrypts (``SSLObject.read``) while a sending thread may encrypt
    (``SSLObject.write``): one OpenSSL object must not be used by two threads at once, so
    both hold ``_tls_lock``, never across a socket call. Only senders (one at a time: the
    core serialises sends) move bytes from the outgoing BIO to the socket, so the records go
    out in the order they were made; the few bytes a read can make (a TLS 1.3 KeyUpdate
    answer) go out with the next send. A send that fails after encrypting closes the
    connection: the TLS stream cannot skip records.
    """

    def __init__(
        self,
        sock: socket.socket,
        connector: ConnectorInfo | None,
        reactor: Reactor,
        driver: object,
        *,
        max_frame_size: int,
        send_timeout: float,
        tls: TlsSettings,
        server_hostname: str | None = None,
        timer: HandshakeTimer | None = None,
    ) -> None:
        super().__init__(sock, connector, reactor, driver, max_frame_size=max_frame_size, send_timeout=send_timeout)
        self._tls = tls
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        # The settings' current context: after reload_tls() new connections get the new files.
        if tls.server:
            self._ssl = tls.server_context().wrap_bio(self._incoming, self._outgoing, server_side=True)
        else:
            self._ssl = tls.client_context().wrap_bio(
                self._incoming, self._outgoing, server_side=False, server_hostname=server_hostname
            )
        self._tls_lock = threading.Lock()
        self._established = False
        self._timer = timer
        self._handshake_deadline = time.monotonic() + tls.handshake_timeout
        self._handshake_expired = False
        self._bytes_in = 0  # bytes received during the handshake
        self._tls_props: dict = {}

    @property
    def established(self) -> bool:
        """True once the TLS handshake is complete (the connection then belongs to the core)."""
        return self._established

    def get_conn_properties(self) -> dict:
        """``peer_addr``/``local_addr`` and the TLS details (``peer_cn``, ``tls_version``,
        ``tls_cipher``, ``identity_binding``)."""
        return {**super().get_conn_properties(), **self._tls_props}

    # -- handshake -----------------------------------------------------------------------

    def _who(self) -> str:
        return "the client" if self._tls.server else "the server"

    def _handshake_step(self) -> bool:
        """Run the handshake on what has arrived; send what it made. True once complete."""
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush_handshake()
            return False
        except ssl.SSLError as e:
            self._flush_handshake(best_effort=True)  # an alert tells the peer why
            raise HandshakeFailed(self._describe(e)) from None
        self._flush_handshake()
        self._established = True
        self._tls_props = peer_properties(self._ssl, self._tls)
        return True

    def _describe(self, e: ssl.SSLError) -> str:
        if isinstance(e, ssl.SSLCertVerificationError):
            whose = "the client's" if self._tls.server else "the server's"
            return f"{whose} certificate is refused: {e.verify_message} ({e.reason})"
        if e.reason == "WRONG_VERSION_NUMBER" and not self._tls.server:
            return "the server is not speaking TLS (its answer is not a TLS record: a plaintext tcp:// listener?)"
        if e.reason and "ALERT" in e.reason:
            return f"{self._who()} refused the TLS handshake with alert {e.reason} (our certificate?)"
        if e.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "the client sent no certificate, and this listener requires one (connection_security=mtls)"
        return f"TLS handshake failed: {e.reason or e}"

    def _flush_handshake(self, best_effort: bool = False) -> None:
        """Send the handshake's bytes. Its flights are a few KB and fit the socket buffer;
        if the kernel takes only part, wait for room until the handshake's deadline."""
        data = self._outgoing.read()
        if not data:
            return
        view = memoryview(data)
        poller: select.poll | None = None
        while view:
            try:
                n = self.sock.send(view)
            except BlockingIOError:
                n = 0
            except OSError as e:
                if best_effort:
                    return
                raise HandshakeFailed(f"cannot send the TLS handshake to {_fmt(self._peer)}: {e}") from None
            view = view[n:]
            if not view or best_effort:
                return
            wait = self._handshake_deadline - time.monotonic()
            if wait <= 0 or self._closing:
                raise HandshakeFailed(f"{self._who()} took no TLS handshake bytes for {self._tls.handshake_timeout} s")
            if poller is None:
                poller = select.poll()
                poller.register(self._fd, select.POLLOUT)
            poller.poll(min(wait, 1.0) * 1000)

    def _take_handshake_bytes(self, raw: memoryview, n: int) -> bool:
        """Feed ``n`` received bytes to the handshake. True once it is complete."""
        if not self._bytes_in:
            first = raw[0]
            if self._tls.server and first != _HANDSHAKE_RECORD:
                try:
                    self.sock.send(_NOT_TLS_ALERT)
                except OSError:
                    pass
                raise HandshakeFailed(
                    f"not TLS: the first bytes from {self._who()} are not a TLS ClientHello "
                    f"(first byte 0x{first:02x}): a plaintext client (tcp:// without secure=true) on this "
                    f"{self._tls.scheme or 'stcp'}:// listener?"
                )
            if not self._tls.server and first not in (_HANDSHAKE_RECORD, _ALERT_RECORD):
                raise HandshakeFailed(
                    f"the server is not speaking TLS: its first bytes are not a TLS record (first byte 0x{first:02x}); "
                    "a plaintext tcp:// listener?"
                )
        self._bytes_in += n
        self._incoming.write(raw[:n])
        return self._handshake_step()

    def _eof_in_handshake(self) -> str:
        if self._handshake_expired:
            return f"no TLS handshake within tls_handshake_timeout={self._tls.handshake_timeout} s"
        if not self._tls.server and not self._bytes_in:
            return (
                "the server is not speaking TLS: it closed the connection without a TLS answer "
                "(a plaintext tcp:// listener?)"
            )
        return f"{self._who()} closed the connection during the TLS handshake"

    def handshake_blocking(self, stopping) -> None:
        """Active side: run the whole handshake on this (the connector's) thread, up to the
        handshake timeout. Raises :class:`HandshakeFailed` saying why it cannot complete."""
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        raw = _raw_buffer()
        if self._handshake_step():
            return
        while True:
            wait = self._handshake_deadline - time.monotonic()
            if wait <= 0:
                if not self._bytes_in:
                    raise HandshakeFailed(
                        f"no TLS answer from the server within tls_handshake_timeout={self._tls.handshake_timeout} s: "
                        "the server is not speaking TLS? (a plaintext tcp:// listener waits for a frame)"
                    )
                raise HandshakeFailed(f"no TLS handshake within tls_handshake_timeout={self._tls.handshake_timeout} s")
            if stopping():
                raise CommError(CommError.CLOSED, "tcp driver shut down during the TLS handshake")
            if not poller.poll(min(wait, 0.1) * 1000):
                continue
            try:
                n = self.sock.recv_into(raw)
            except BlockingIOError:
                continue
            except OSError as e:
                if not self._bytes_in:
                    raise HandshakeFailed(
                        f"the server is not speaking TLS: it reset the connection without a TLS answer ({e.strerror}); "
                        "a plaintext tcp:// listener?"
                    ) from None
                raise HandshakeFailed(f"TLS handshake: {e}") from None
            if n == 0:
                raise HandshakeFailed(self._eof_in_handshake())
            if self._take_handshake_bytes(raw, n):
                return

    def _handshake_readable(self) -> None:
        """Passive side, on a pool thread: take what arrived, never wait for more."""
        raw = _raw_buffer()
        try:
            try:
                n = self.sock.recv_into(raw)
            except BlockingIOError:
                return
            except OSError as e:
                raise HandshakeFailed(f"during the TLS handshake: {e}") from None
            if n == 0:
                reason = self._eof_in_handshake()
                level = logging.WARNING if self._handshake_expired else logging.INFO
                log.log(level, "connection %s from %s: closing: %s", self.name, _fmt(self._peer), reason)
                self._eof = True
                return
            if not self._take_handshake_bytes(raw, n):
                return
        except HandshakeFailed as e:
            log.warning("connection %s from %s: closing: %s", self.name, _fmt(self._peer), e)
            self._eof = True
            return
        if self._timer is not None:
            self._timer.discard(self)
        # Only now does the core see the connection: its SFM handshake runs over TLS.
        self._driver.add_connection(self)
        if self._closing:
            return
        # The peer's first frames may have come in the same segment as its Finished.
        self._decrypt_and_deliver()

    def handshake_expired(self) -> None:
        """The handshake timer fired: close; the pool thread that sees it logs why."""
        if not self._established:
            self._handshake_expired = True
            self.close()

    # -- sending -------------------------------------------------------------------------

    def send_frames(self, bufs: list, count: int) -> None:
        """Several whole frames, their buffers back to back: encrypted together, one send."""
        self.send_frame(bufs)

    def send_frame(self, frame) -> None:
        bufs = frame if isinstance(frame, list) else [frame]
        if self._closing:
            raise CommError(CommError.CLOSED, f"connection {self.name} to {_fmt(self._peer)} is closed")
        self._sends += 1
        try:
            if sum(map(len, bufs)) <= _ONE_RECORD:
                self._send_raw(self._encrypt(bufs[0] if len(bufs) == 1 else b"".join(bufs)))
                return
            ssl_write = self._ssl.write
            outgoing = self._outgoing
            for buf in bufs:
                view = buf if isinstance(buf, memoryview) else memoryview(buf)
                size = view.nbytes
                for start in range(0, size, _CHUNK):
                    with self._tls_lock:
                        ssl_write(view[start : start + _CHUNK] if size > _CHUNK else view)
                        data = outgoing.read() if outgoing.pending >= _CHUNK else None
                    if data:
                        self._send_raw(data)
            with self._tls_lock:
                data = outgoing.read()
            self._send_raw(data)
        except ssl.SSLError as e:
            self.close()
            raise CommError(CommError.CLOSED, f"connection {self.name} to {_fmt(self._peer)}: TLS: {e}") from None
        except BaseException:
            self.close()  # records were made that the peer will never get: the stream is cut
            raise

    def _encrypt(self, data) -> bytes:
        with self._tls_lock:
            self._ssl.write(data)
            return self._outgoing.read()

    def _send_raw(self, data: bytes) -> None:
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            raise CommError(CommError.CLOSED, f"connection {self.name} to {_fmt(self._peer)}: {e}") from None
        if sent != len(data):
            self._send_rest([data], sent)

    # -- receiving -----------------------------------------------------------------------

    def on_readable(self) -> None:
        self._reader = threading.get_ident()
        sends = self._sends
        try:
            if self._established:
                if self._deferred:
                    self._deliver_deferred()
                self._read_and_deliver()
            else:
                self._handshake_readable()
            self._deliver_deferred()
            if self._eof:
                self._finish()
        finally:
            self._reader = None
            self._one_way = self._sends == sends

    def _deliver_deferred(self) -> None:
        while self._deferred and not self._closing:
            frames, self._deferred, self._deferred_bytes = self._deferred, [], 0
            self._hand_over(frames)

    def _decrypt(self) -> list:
        """Decrypt everything the incoming BIO holds into the decoder; return whole frames.

        Always drains the BIO: epoll cannot see bytes waiting there. Sets ``_eof`` on the
        peer's close_notify or a TLS error (logged), after the frames before it."""
        decoder = self._decoder
        read = self._ssl.read
        frames: list = []
        while True:
            buf = decoder.get_buffer()
            size = len(buf)
            got = 0
            drained = False
            try:
                with self._tls_lock:
                    while got < size:
                        got += read(size - got, buf[got:] if got else buf)
            except ssl.SSLWantReadError:
                drained = True
            except ssl.SSLZeroReturnError:
                drained = self._eof = True  # close_notify: a clean end
            except ssl.SSLError as e:
                drained = self._eof = True
                self._tls_failed(e)
            if got:
                frames += decoder.buffer_updated(got)
            if drained:
                return frames

    def _tls_failed(self, e: ssl.SSLError) -> None:
        reason = e.reason or str(e)
        if "ALERT" in reason:
            hint = " (it refused our certificate?)" if not self._tls.server else ""
            log.warning(
                "connection %s to %s: %s sent TLS alert %s%s; closing",
                self.name,
                _fmt(self._peer),
                self._who(),
                reason,
                hint,
            )
        else:
            log.warning("connection %s: closing, bad TLS data from %s: %s", self.name, _fmt(self._peer), reason)

    def _decrypt_and_deliver(self) -> None:
        try:
            frames = self._decrypt()
        except CommError as e:
            log.warning("connection %s: closing, bad data from %s: %s", self.name, _fmt(self._peer), e.message)
            self._eof = True
            return
        self._hand_over(frames)

    def _read_and_deliver(self) -> None:
        decoder = self._decoder
        recv_into = self.sock.recv_into
        write = self._incoming.write
        raw = _raw_buffer()
        frames: list = []
        reads = 0
        waited = False
        try:
            while reads < _READS_PER_EVENT or decoder.in_large_frame:
                try:
                    n = recv_into(raw)
                except BlockingIOError:
                    if self._wait_for_rest():
                        waited = True
                        continue
                    break
                waited = self._note_read(n, waited)
                reads += 1
                if n == 0:
                    self._at_eof()
                    break
                write(raw[:n])
                done = self._decrypt()
                if not decoder.in_large_frame:
                    self._trickling = False
                if done:
                    frames += done
                    if len(done[-1]) >= _DELIVER_AT_ONCE:
                        self._hand_over(frames)
                        frames = []
                        if self._deferred:
                            break  # read ahead by a reply sent from that delivery: those come first
                if self._eof or (n < len(raw) and not decoder.in_large_frame):
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
            self.frame_receiver.bytes_received()

    def _read_while_sending(self) -> bool:
        """Read (and decrypt) frames for later delivery; False once reading should stop."""
        raw = _raw_buffer()
        try:
            while self._deferred_bytes < _READ_WHILE_SENDING:
                n = self.sock.recv_into(raw)
                if n == 0:
                    self._eof = True
                    return False
                self._incoming.write(raw[:n])
                for frame in self._decrypt():
                    self._deferred.append(frame)
                    self._deferred_bytes += len(frame)
                if self._eof:
                    return False
        except BlockingIOError:
            return True
        except CommError as e:
            log.warning("connection %s: closing, bad data from %s: %s", self.name, _fmt(self._peer), e.message)
            self.close()
        except OSError:
            self._eof = True
        return False

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.discard(self)
        super()._finish()


class HandshakeTimer:
    """Closes the passive connections whose TLS handshake is not complete by their deadline.

    One thread per driver, started when a handshake is pending and gone when none is: the
    reactor's threads only run on socket events, and a peer that says nothing sends none.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, TlsTcpConnection]] = []
        self._pending: set[TlsTcpConnection] = set()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def add(self, conn: TlsTcpConnection, timeout: float) -> None:
        with self._cond:
            if self._stopped:
                return
            deadline = time.monotonic() + timeout
            earliest = not self._heap or deadline < self._heap[0][0]
            heapq.heappush(self._heap, (deadline, next(self._seq), conn))
            self._pending.add(conn)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            elif earliest:
                self._cond.notify()

    def discard(self, conn: TlsTcpConnection) -> None:
        with self._cond:
            if conn in self._pending:
                self._pending.discard(conn)
                if not self._pending:
                    self._heap.clear()
                    self._cond.notify()  # nothing left to time: the thread ends

    def _run(self) -> None:
        with self._cond:
            try:
                while not self._stopped and self._pending:
                    deadline, _, conn = self._heap[0]
                    if conn not in self._pending:
                        heapq.heappop(self._heap)  # completed or closed meanwhile
                        continue
                    wait = deadline - time.monotonic()
                    if wait > 0:
                        self._cond.wait(wait)
                        continue
                    heapq.heappop(self._heap)
                    self._pending.discard(conn)
                    self._cond.release()
                    try:
                        conn.handshake_expired()
                    except Exception:
                        log.exception("error closing %s", conn)
                    finally:
                        self._cond.acquire()
            finally:
                if self._thread is threading.current_thread():
                    self._thread = None

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
