"""One WebSocket connection: an asyncio Protocol on the shared loop around websockets' sans-I/O core.

No task or coroutine per connection and no per-message await: bytes from the socket go into
``websockets``' ``ServerProtocol``/``ClientProtocol`` (which does HTTP upgrade, framing, masking,
ping/pong and close), and each whole binary message is checked with ``sfm_core.frame_check`` and
handed to the core in batches. Sends come from user threads into a per-connection SendQueue; one
``call_soon_threadsafe`` wakes the loop per batch, not per frame.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
import threading
from typing import Any

from websockets.exceptions import InvalidMessage, PayloadTooBig
from websockets.frames import CloseCode, Opcode, apply_mask
from websockets.http11 import Request, Response
from websockets.protocol import CLOSED, OPEN, Protocol
from websockets.server import ServerProtocol

from sfm_core import CommError, ConnectorInfo
from sfm_core.aio_driver import AioConnection
from sfm_core.frame_check import MessageFrames
from sfm_core.frames import HANDSHAKE_MAX_FRAME
from sfm_core.send_queue import SendQueue
from sfm_core.tls import TlsSettings, peer_properties
from sfm_core.url import host_port

from .tls import TLS_HANDSHAKE_RECORD, describe_tls_error, secure_scheme

log = logging.getLogger(__name__)

_HDR16 = struct.Struct("!BBH")
_HDR64 = struct.Struct("!BBQ")
# Frames below this size are joined into one buffer (cheaper than a write each); larger payload
# buffers are written as they are, after the WebSocket header and the SFM head.
_JOIN_BELOW = 64 * 1024
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
#: At most this many WebSocket frames make one (fragmented) message; more closes with 1009. A
#: message of the largest size (2 GiB) in fragments of 32 KiB or more fits.
MAX_FRAGMENTS = 65536
#: How often drain() looks at the transport's write buffer (asyncio says nothing when it empties).
_DRAIN_POLL = 0.005


def _stable(b: Any) -> bool:
    """True if ``b`` cannot change after send_frame returns: bytes, or a read-only view of bytes."""
    t = type(b)
    return t is bytes or (t is memoryview and b.readonly and type(b.obj) is bytes)


def _first_message_limit(proto: Protocol, later: int | None) -> None:
    """Limit the first message to HANDSHAKE_MAX_FRAME, then allow ``later`` (as the TCP driver).

    The limit is raised inside the parser, as soon as the first whole data message is parsed, so
    a big second message that arrives in the same read is measured against the right limit.
    """
    proto.max_message_size = HANDSHAKE_MAX_FRAME if later is None else min(later, HANDSHAKE_MAX_FRAME)
    recv_frame = type(proto).recv_frame

    def first_recv_frame(frame: Any) -> None:
        recv_frame(proto, frame)
        if frame.fin and frame.opcode in (Opcode.BINARY, Opcode.CONT, Opcode.TEXT):
            proto.max_message_size = later
            del proto.recv_frame  # back to the class's method: no cost per frame from now on

    proto.recv_frame = first_recv_frame  # type: ignore[method-assign]


class WebSocketConnection(AioConnection, asyncio.Protocol):
    """A WebSocket connection carrying one SFM frame per binary message.

    Created by the driver on the shared loop, either for an accepted socket (server side: it
    first answers the HTTP upgrade of ``path``) or for an outgoing one (client side, given a
    ``ClientProtocol`` whose request it sends). Every method not marked otherwise runs on the
    loop thread; ``send_frame``, ``send_urgent``, ``drain``, ``close``, ``pause_reading`` and
    ``resume_reading`` are thread-safe.
    """

    supports_pause = True

    def __init__(
        self,
        driver: Any,
        connector: ConnectorInfo | None,
        loop: asyncio.AbstractEventLoop,
        proto: Protocol,
        *,
        path: str,
        max_frame_size: int,
        send_timeout: float,
        open_timeout: float,
        close_timeout: float,
        high_water: int,
        tls: TlsSettings | None = None,
    ) -> None:
        AioConnection.__init__(self, connector)
        self.driver = driver
        self.loop = loop
        self.proto = proto
        self.path = path
        self.max_frame_size = max_frame_size
        self.send_timeout = send_timeout
        self.open_timeout = open_timeout
        self.close_timeout = close_timeout
        self.high_water = high_water
        self.is_server = isinstance(proto, ServerProtocol)
        #: The connector's TLS settings, or None for plaintext.
        self.tls = tls
        self._tls_props: dict = {}
        # A plaintext listener looks at the first bytes: a TLS ClientHello gets a clear refusal.
        self._check_first_bytes = self.is_server and tls is None
        self.transport: asyncio.Transport | None = None
        self._peer: object = None
        self._local: object = None
        #: Resolved (client side) when the upgrade completed, with an exception if it failed.
        self.opened: asyncio.Future | None = None
        self.added = False  # handed to the core through add_connection
        self._timer: asyncio.TimerHandle | None = None
        self._reason_logged = False
        self._fragments: bytearray | None = None  # the message being joined from fragments
        self._nfragments = 0
        self._responded = False  # server side: an HTTP response was sent
        self._early: list = []  # client side: frames that came before add_connection
        self._loop_tid = -1

        # Send side: frames from user threads (and encoded control frames from send_urgent,
        # written first) until _flush writes them on the loop; closed: no more sends accepted.
        self._sendq: SendQueue = SendQueue(high_water, timeout=send_timeout, describe=self._describe, loop=loop)
        self._write_paused = False  # loop thread only
        self._close_after_flush = False  # close() asked: send the Close once the queue is written
        # Reading: the core's wish (pause_reading/resume_reading, any thread) and our own hold
        # (client side, until add_connection); the transport reads only when neither says stop.
        self._core_paused = False
        self._held = False
        # Each message one whole frame. websockets' parser bounds the first message (the
        # handshake) already, before it is buffered: see _first_message_limit.
        self._frames = MessageFrames(max_frame_size, what="the WebSocket message")
        _first_message_limit(proto, max_frame_size)

    # -- properties ------------------------------------------------------------------------

    def _describe(self) -> str:
        return f"connection {self.name} to {host_port(self._peer)}"

    @property
    def lost(self) -> threading.Event:
        """Set once the transport is gone (connection_lost ran): :meth:`wait_closed`."""
        return self._closed_event

    @property
    def _queue(self) -> Any:
        """The data frames queued and not yet written (for tests and debugging)."""
        return self._sendq.items

    @property
    def _queued_bytes(self) -> int:
        return self._sendq.queued_bytes

    @property
    def _lock(self) -> Any:
        return self._sendq.lock

    def get_conn_properties(self) -> dict:
        """``peer_addr``/``local_addr`` as ``host:port`` strings, the WebSocket ``path``, and on
        TLS ``peer_cn``, ``tls_version``, ``tls_cipher``, ``identity_binding``."""
        props = {"peer_addr": host_port(self._peer), "local_addr": host_port(self._local), "path": self.path}
        if self._tls_props:
            props.update(self._tls_props)
        return props

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop_tid = threading.get_ident()
        self._peer = transport.get_extra_info("peername")
        self._local = transport.get_extra_info("sockname")
        connector = self.connector
        if self.is_server and self.slot is None and connector is not None:
            # A plaintext listener's connection takes its slot here, right after accept().
            self.slot = connector.admit(host_port(self._peer))
            if self.slot is None and connector.limits is not None:
                transport.abort()  # the listener is full; the limit logs why
                return
        if self.tls is not None:
            # With TLS asyncio calls connection_made once the TLS handshake is done.
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                self._tls_props = peer_properties(ssl_object, self.tls)
        # Our own bound on the transport buffer; pause_writing/resume_writing drive the flush.
        transport.set_write_buffer_limits(high=self.high_water, low=self.high_water // 4)
        self.driver._live.add(self)
        self._timer = self.loop.call_later(self.open_timeout, self._open_timed_out)
        if not self.is_server:
            proto = self.proto
            proto.send_request(proto.connect())  # type: ignore[attr-defined]
            self._write_out()

    def data_received(self, data: bytes) -> None:
        if self._check_first_bytes:
            self._check_first_bytes = False
            if data[:1] == bytes((TLS_HANDSHAKE_RECORD,)):
                self._tls_on_plaintext()
                return
        proto = self.proto
        proto.receive_data(data)
        events = proto.events_received()
        if events:
            self._handle_events(events)
        if self.is_server and not self._responded and proto.handshake_exc is not None:
            # Not HTTP at all: websockets just closes; answer 400 so a human sees why.
            self._responded = True
            self._log_reason(proto.handshake_exc)
            if self.transport is not None:
                self.transport.write(_BAD_REQUEST)
        self._write_out()
        if proto.parser_exc is not None:
            self._log_reason(proto.parser_exc)

    def eof_received(self) -> bool | None:
        proto = self.proto
        if proto.state is OPEN and (
            proto.reader.buffer or proto.current_size is not None or self._fragments is not None
        ):
            pending = len(proto.reader.buffer) + (proto.current_size or 0)
            self._log_reason(f"peer closed in the middle of a message ({pending} bytes of it received)")
        proto.receive_eof()
        self._write_out()
        self._start_close_timer()  # a peer that sent EOF but never reads must not keep us open
        return None  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.slot is not None and not self.added:
            self.slot.release()  # remove_connection releases it otherwise
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._drop_unsent("connection lost" if exc is None else f"connection lost ({exc})")
        if exc is not None and not self._reason_logged:
            self._reason_logged = True
            log.info("connection %s to %s lost: %s", self.name, host_port(self._peer), exc)
        opened = self.opened
        if opened is not None and not opened.done():
            if self.tls is not None:
                # On TLS 1.3 a listener checks our certificate after our side of the handshake is
                # done, and asyncio closes without sending the alert: the upgrade gets no answer.
                if exc is None:
                    why = (
                        "connection closed before the WebSocket upgrade was answered, right after the TLS "
                        "handshake (did the listener refuse our client certificate? its log says why)"
                    )
                else:
                    why = describe_tls_error(exc, self._scheme())
                    why = f"connection lost before the WebSocket upgrade was answered: {why}"
                message = f"websocket handshake with {host_port(self._peer)} failed: {why}"
            else:
                message = self._handshake_error("connection closed" if exc is None else f"connection closed: {exc}")
            opened.set_exception(CommError(CommError.CLOSED, message))
        self.driver._live.discard(self)
        self.set_closed()  # the transport is gone (connection_lost ran)
        if self.added:
            self.driver.remove_connection(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        # The peer took bytes we had to wait for: it is alive, only slow.
        self._bytes_sent()
        self._flush(notify=False)

    def _bytes_sent(self) -> None:
        receiver = self.frame_receiver
        if receiver is not None:
            receiver.bytes_sent()

    def _scheme(self) -> str:
        return str((self.connector.params.get("scheme") if self.connector else None) or "ws")

    def _tls_on_plaintext(self) -> None:
        """A TLS ClientHello reached this plaintext listener: say so, answer 400 (the client's
        TLS sees bytes that are not TLS) and close."""
        scheme = self._scheme()
        log.warning(
            "connection %s from %s: not a WebSocket client: TLS ClientHello on a plaintext %s listener: the client "
            "uses %s://?; answering 400 and closing",
            self.name,
            host_port(self._peer),
            scheme,
            secure_scheme(scheme),
        )
        self._reason_logged = True
        self._responded = True
        self._sendq.close()
        if self.transport is not None:
            self.transport.write(_BAD_REQUEST)
            self.transport.close()

    # -- the opening handshake -------------------------------------------------------------

    def start_reading(self) -> None:
        """Client side, after add_connection: deliver what came early and read on (loop thread)."""
        early, self._early = self._early, []
        if early:
            try:
                self.process_frames(early)
            except CommError as e:
                self._fail(CloseCode.INTERNAL_ERROR, f"frames not accepted: {e}")
                return
        self._held = False
        self._apply_reading()  # unless the core paused us meanwhile (while taking the early frames)

    def _handshake_done(self) -> None:
        """The protocol turned OPEN: hand the connection to the core (server) or the connector."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.is_server:
            self.driver._server_opened(self)
        else:
            # The connector thread calls add_connection; nothing may be read before that.
            self._held = True
            self.transport.pause_reading()  # type: ignore[union-attr]
            if self.opened is not None and not self.opened.done():
                self.opened.set_result(self)

    def _handle_request(self, request: Request) -> None:
        proto = self.proto
        assert isinstance(proto, ServerProtocol)
        path = request.path.split("?", 1)[0]
        if path != self.path:
            log.info("websocket listener: %s asked for %s; answering 404", host_port(self._peer), request.path)
            response = proto.reject(404, f"Not Found: the SFM WebSocket is at {self.path}\n")
        else:
            response = proto.accept(request)
            if response.status_code != 101:
                log.info(
                    "websocket listener: refused %s from %s: %d %s (%s)",
                    request.path,
                    host_port(self._peer),
                    response.status_code,
                    response.reason_phrase,
                    proto.handshake_exc,
                )
        self._responded = True
        proto.send_response(response)
        if response.status_code == 101:
            self._handshake_done()

    def _handshake_error(self, what: str) -> str:
        exc = self.proto.handshake_exc
        return f"websocket handshake with {host_port(self._peer)} failed: {exc or what}"

    def _open_timed_out(self) -> None:
        self._timer = None
        if self.proto.state is not OPEN and self.transport is not None:
            log.warning(
                "connection %s: no WebSocket upgrade with %s within %s s; closing",
                self.name,
                host_port(self._peer),
                self.open_timeout,
            )
            self._reason_logged = True
            self.transport.abort()

    # -- receiving -------------------------------------------------------------------------

    def _handle_events(self, events: list) -> None:
        frames: list = []
        for event in events:
            if isinstance(event, Request):
                self._handle_request(event)
                continue
            if isinstance(event, Response):
                self._on_response(event)
                continue
            opcode = event.opcode
            if opcode is Opcode.BINARY:
                if event.fin:
                    message = event.data
                else:
                    self._fragments = bytearray(event.data)
                    self._nfragments = 1
                    continue
            elif opcode is Opcode.CONT:
                fragments = self._fragments
                if fragments is None:
                    continue  # the protocol already refuses a stray continuation
                fragments += event.data
                self._nfragments += 1
                if self._nfragments > MAX_FRAGMENTS:
                    self._fragments = None
                    self._fail(CloseCode.MESSAGE_TOO_BIG, f"message in more than {MAX_FRAGMENTS} fragments")
                    break
                if not event.fin:
                    continue
                message = fragments
                self._fragments = None
            elif opcode is Opcode.TEXT:
                self._fail(CloseCode.UNSUPPORTED_DATA, "text message received; SFM frames are binary messages")
                break
            else:
                if opcode is Opcode.CLOSE:
                    self._sendq.close()
                    # The protocol answers; a peer that then never closes TCP must not keep us open.
                    self._start_close_timer()
                continue  # ping/pong/close: the protocol answers them
            try:
                frames.append(self._frames.one(message))
            except CommError as e:
                self._fail(CloseCode.INVALID_DATA, str(e.message))
                break
        if frames and not self.added:
            self._early.extend(frames)
        elif frames:
            try:
                self.process_frames(frames)
            except CommError as e:
                self._fail(CloseCode.INTERNAL_ERROR, f"frames not accepted: {e}")

    def _on_response(self, response: Response) -> None:
        proto = self.proto
        if proto.handshake_exc is not None or proto.state is not OPEN:
            opened = self.opened
            if opened is not None and not opened.done():
                message = self._handshake_error(str(response.status_code))
                body = bytes(response.body or b"")[:300].decode("utf-8", "replace").strip()
                if body:
                    message += f": {body}"
                opened.set_exception(CommError(CommError.CLOSED, message))
            self._reason_logged = True
            if self.transport is not None:
                self.transport.close()
            return
        self._handshake_done()

    def _fail(self, code: int, reason: str) -> None:
        """Close this connection (only) because of what the peer sent, logging why."""
        self._log_reason(reason)
        self._sendq.close()
        if self.proto.state is OPEN:
            self.proto.fail(code, reason[:120])
        self._write_out()
        self._start_close_timer()

    def _log_reason(self, reason: object) -> None:
        if self._reason_logged:
            return
        self._reason_logged = True
        if isinstance(reason, PayloadTooBig):
            if "recv_frame" in vars(self.proto):  # still before the first message
                reason = f"first message too big (at most {HANDSHAKE_MAX_FRAME} bytes before the handshake): {reason}"
            else:
                reason = f"message too big for max_frame_size {self.max_frame_size}: {reason}"
        elif isinstance(reason, InvalidMessage):
            reason = f"not a WebSocket client: {reason} ({reason.__cause__})"
        elif isinstance(reason, EOFError):
            reason = "peer closed the TCP connection without a WebSocket close"
            log.info("connection %s from %s: %s", self.name, host_port(self._peer), reason)
            return
        log.warning("connection %s with %s: closing: %s", self.name, host_port(self._peer), reason)

    def pause_reading(self) -> None:
        """Stop reading from the socket (any thread)."""
        self._core_paused = True
        self._call(self._apply_reading)

    def resume_reading(self) -> None:
        """Read from the socket again (any thread)."""
        self._core_paused = False
        self._call(self._apply_reading)

    def _apply_reading(self) -> None:
        """Make the transport read or not, from the latest wishes (loop thread; idempotent)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._held or self._core_paused:
            transport.pause_reading()
        else:
            transport.resume_reading()

    # -- sending ---------------------------------------------------------------------------

    def send_frame(self, frame: Any) -> None:
        """Queue one SFM frame as one binary message; blocks while too much is outstanding.

        When it returns the caller may reuse its buffers: bytes (and read-only views of bytes)
        are queued as they are; a frame with a writable buffer (bytearray, writable memoryview,
        mmap) is joined here if small (as the loop would join it anyway); a big one is encoded
        here into new buffers: masked on the client side (a copy that masking makes anyway), a
        copy of each writable buffer on the server side.
        """
        bufs = frame if isinstance(frame, list) else [frame]
        size = 0
        stable = True
        for b in bufs:
            size += b.nbytes if isinstance(b, memoryview) else len(b)
            if stable and not _stable(b):
                stable = False
        if not stable:
            if size < _JOIN_BELOW:
                bufs = [b"".join(bufs)]  # the join the loop would make anyway, made here
            else:
                chunks: list = []
                self._encode_data_frame(bufs, chunks, copy=True)
                bufs = tuple(chunks)  # a tuple: already encoded (see _flush)
        # One frame may always go when nothing is queued, however big it is.
        if not self._sendq.put(bufs, size):
            return  # a flush is already on its way
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # loop closed under us
            raise CommError(CommError.CLOSED, f"connection {self.name}: event loop is closed") from None

    def send_urgent(self, frame: bytes) -> bool:
        """Write a small control frame (PING/PONG) before the data frames queued here (any thread).

        Never blocks, not even while another thread waits in :meth:`send_frame`: the frame goes
        to a list of its own, and the loop writes that list before the queue, also while writing
        is paused (the transport buffer may then exceed ``high_water`` by the control frame).
        Loop writes are whole WebSocket frames, so that is a frame boundary. False once closing.
        """
        chunks: list = []
        self._encode_data_frame([frame], chunks, copy=True)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        try:
            if not self._sendq.put_urgent(data):
                return True  # a flush is already on its way
        except CommError:  # closing
            return False
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # loop closed under us: the connection is gone
            return False
        return True

    def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` s until every accepted frame is in the kernel; return how many are not.

        Frames still in the queue count one each, a non-empty transport buffer one more. On the
        loop thread it does not wait (the loop is what writes). Once the connection is lost it
        returns the frames that were dropped unsent (0 if none).
        """
        if threading.get_ident() == self._loop_tid or self.closed:
            return self._unsent()
        done = threading.Event()
        left = [self._sendq.pending()]
        stop = [False]

        def check() -> None:
            left[0] = n = self._unsent()
            if n == 0 or self.closed or stop[0]:
                done.set()
                return
            self.loop.call_later(_DRAIN_POLL, check)

        try:
            self.loop.call_soon_threadsafe(check)
        except RuntimeError:  # the loop is closed: nothing more will be written
            return left[0] + self._sendq.dropped
        if not done.wait(max(timeout, 0.0)):
            stop[0] = True
        return left[0]

    def _unsent(self) -> int:
        """Frames accepted and not yet in the kernel (loop thread, or after the loss)."""
        if self.closed:
            return self._sendq.dropped
        n = self._sendq.pending()
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size():
            n += 1
        return n

    def _drop_unsent(self, why: str, buffered: int = 0) -> None:
        """Stop accepting sends and forget what is queued, with a WARNING if that was anything."""
        # The transport buffer holds (the end of) at least one frame, maybe only the Close.
        frames, nbytes, urgent = self._sendq.drop(extra=1 if buffered else 0)
        if frames or buffered or urgent:
            log.warning(
                "connection %s to %s: %s: dropped unsent %d queued frame(s) (%d bytes), %d bytes of the"
                " transport buffer and %d control frame(s)",
                self.name,
                host_port(self._peer),
                why,
                frames,
                nbytes,
                buffered,
                urgent,
            )

    def _flush(self, notify: bool = True) -> None:
        # Everything queued, unless writing is paused: then only the control frames.
        paused = self._write_paused
        batch = self._sendq.take(data=not paused, release=True, idle=True)
        urgent = batch.urgent
        queue = None if paused else batch.items
        released = batch.waiters and bool(queue)
        if self.proto.state is not OPEN or self.transport is None:
            if queue:
                self._sendq.drop(extra=len(queue))
                log.warning(
                    "connection %s to %s: %d frame(s) dropped unsent: the WebSocket is closing (%s)",
                    self.name,
                    host_port(self._peer),
                    len(queue),
                    self.proto.state.name,
                )
            return
        if urgent:
            # Before the queue, also while writing is paused: small, and they keep the peer from
            # thinking us dead while the data waits.
            self._write_out()
            self._write_chunks(urgent)
        if released and notify:
            self._bytes_sent()
        if queue is None:
            return
        if queue:
            self._write_out()  # control frames the protocol queued go first, in order
            chunks: list = []
            for bufs in queue:
                if type(bufs) is tuple:  # encoded by send_frame
                    chunks.extend(bufs)
                else:
                    self._encode_data_frame(bufs, chunks)
            self._write_chunks(chunks)
        if self._close_after_flush:
            # close() was asked: every frame send_frame accepted is written; now the Close.
            self._close_after_flush = False
            self.proto.send_close(CloseCode.NORMAL_CLOSURE)
            self._write_out()

    def _encode_data_frame(self, bufs: list, out: list, copy: bool = False) -> None:
        """Append one binary WebSocket frame carrying ``bufs`` to ``out``, copying as little as we can.

        websockets' serializer would copy the payload into a new bytes (and the receiver would
        have to join fragments), so data frames are framed here (RFC 6455 5.2); the protocol
        object still does the handshake, parsing, ping/pong and close. With ``copy`` nothing in
        ``out`` refers to a writable buffer of ``bufs`` (masking and joining make new bytes anyway).
        """
        total = 0
        for b in bufs:
            total += b.nbytes if isinstance(b, memoryview) else len(b)
        mask = not self.is_server
        mbit = 0x80 if mask else 0
        if total < 126:
            hdr = bytes((0x82, mbit | total))
        elif total < 65536:
            hdr = _HDR16.pack(0x82, mbit | 126, total)
        else:
            hdr = _HDR64.pack(0x82, mbit | 127, total)
        if total < _JOIN_BELOW:
            data = bufs[0] if len(bufs) == 1 else b"".join(bufs)
            if mask:
                key = secrets.token_bytes(4)
                out.append(hdr + key + apply_mask(data, key))
            else:
                out.append(hdr + data)
            return
        if not mask:
            out.append(hdr)
            if copy:
                out.extend(b if _stable(b) else bytes(b) for b in bufs)
            else:
                out.extend(bufs)
            return
        key = secrets.token_bytes(4)
        out.append(hdr + key)
        offset = 0
        for b in bufs:
            r = offset & 3
            out.append(apply_mask(b, key[r:] + key[:r] if r else key))
            offset += b.nbytes if isinstance(b, memoryview) else len(b)

    def _write_chunks(self, chunks: list) -> None:
        """Write small chunks joined (one syscall per batch), big ones as they are (no join copy)."""
        transport = self.transport
        small: list = []
        for c in chunks:
            n = c.nbytes if isinstance(c, memoryview) else len(c)
            if n < _JOIN_BELOW:
                small.append(c)
                continue
            if small:
                transport.write(small[0] if len(small) == 1 else b"".join(small))  # type: ignore[union-attr]
                small = []
            transport.write(c)  # type: ignore[union-attr]
        if small:
            transport.write(small[0] if len(small) == 1 else b"".join(small))  # type: ignore[union-attr]

    def _write_out(self) -> None:
        transport = self.transport
        writes = self.proto.data_to_send()
        if transport is None or not writes:
            return
        eof = False
        if writes[-1] == b"":
            writes.pop()
            eof = True
        if len(writes) > 1 and sum(map(len, writes)) < _JOIN_BELOW * 4:
            transport.writelines(writes)  # one syscall for a batch of small frames
        else:
            for data in writes:
                if data:
                    transport.write(data)
        if eof:
            # The protocol is done with the stream: flush what is buffered, then close.
            transport.close()

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Start the WebSocket close (any thread, idempotent); the driver then removes it."""
        self._sendq.close()
        if not self.closed:
            self._call(self._close_on_loop)

    def _close_on_loop(self) -> None:
        if self.transport is None or self.closed:
            return
        proto = self.proto
        if proto.state is OPEN:
            # The frames send_frame accepted go first, then the Close (_flush sends it once the
            # queue is written; the close timer bounds how long a slow reader may take).
            self._close_after_flush = True
            self._start_close_timer()
            self._flush()
            return
        if proto.state is not CLOSED:
            self.transport.close()
        self._start_close_timer()

    def abort(self, why: str = "aborted") -> None:
        """Drop the connection now (loop thread), with a WARNING if frames are dropped unsent."""
        transport = self.transport
        if transport is None or self.closed:
            self._sendq.close()
            return
        self._drop_unsent(why, transport.get_write_buffer_size())
        transport.abort()

    def _start_close_timer(self) -> None:
        if self._timer is None and self.transport is not None and not self.closed:
            # A peer that never answers the close, or never reads, must not keep us open.
            self._timer = self.loop.call_later(self.close_timeout, self._close_timed_out)

    def _close_timed_out(self) -> None:
        self._timer = None
        self.abort(f"not closed within close_timeout {self.close_timeout} s")

    def _call(self, fn: Any, *args: Any) -> None:
        if self.closed:
            return
        if threading.get_ident() == self._loop_tid:
            fn(*args)
            return
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the transport is gone with it
            pass
