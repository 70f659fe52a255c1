"""One SFM connection over one gRPC ``Stream`` call, served by tasks on the shared asyncio loop."""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import grpc
from sfm_core import CommError, ConnectorInfo
from sfm_core.aio_driver import AioConnection
from sfm_core.frame_check import MessageFrames
from sfm_core.send_queue import SendQueue

from . import wire

log = logging.getLogger(__name__)

#: The extension name for several SFM frames in one ``Frame.data`` (see docs/drivers/grpc.md).
BATCH_EXTENSION = "grpc-batch"

#: How long a client's close waits for the server to end the call after our last message.
_GRACEFUL_CLOSE = 2.0


def _data_len(item: tuple[bytes, int]) -> int:
    """The SFM bytes of a queued (message, envelope length): what counts in a batch."""
    return len(item[0]) - item[1]


class GrpcConnection(AioConnection):
    """An SFM connection on a bidirectional gRPC stream (server context or client call).

    Sending (any thread): the frame's buffers are joined once into a serialized ``Frame`` on
    the caller's thread, appended to a deque, and the loop is woken only if the writer task
    is idle, so a burst of sends costs one wake-up. The caller blocks while more than
    ``send_queue_bytes`` wait to be written (the writer waits on gRPC flow control, so a
    slow peer slows the sender). Control frames from :meth:`send_urgent` have a deque of
    their own that the writer serves first. Receiving: a reader task on the loop validates each
    ``Frame.data`` and hands the frame(s) to the core as memoryviews of the received message.
    """

    supports_pause = True

    def __init__(
        self,
        connector: ConnectorInfo | None,
        driver: Any,
        loop: asyncio.AbstractEventLoop,
        stream: Any,
        *,
        peer_addr: str,
        local_addr: str,
        max_frame_size: int,
        send_timeout: float,
        send_queue_bytes: int,
        batch: bool,
        batch_bytes: int,
        channel: Any = None,
        is_server: bool = False,
        transport: str = "grpc",
        tls_props: dict | None = None,
    ) -> None:
        self._extensions: frozenset[str] = frozenset()
        self._ext_known = False
        super().__init__(connector)
        self._driver = driver
        self._loop = loop
        self._stream = stream  # grpc.aio ServicerContext or StreamStreamCall: read()/write()
        self._channel = channel  # the client's own channel, closed with the connection
        self._is_server = is_server
        self._peer = peer_addr
        self._local = local_addr
        self._props = {"peer_addr": peer_addr, "local_addr": local_addr, "transport": transport, **(tls_props or {})}
        self._send_timeout = send_timeout
        self._send_queue_bytes = send_queue_bytes
        self._offer = (BATCH_EXTENSION,) if batch else ()
        self._batch_bytes = batch_bytes
        self._frames = MessageFrames(max_frame_size, what="Frame.data")
        self._seq = 0
        self._seqs = itertools.count(1)  # next() is atomic: send_frame and send_urgent share it
        # (serialized Frame, envelope length) items; control frames from send_urgent go first.
        # The writer task takes by itself when it starts: no wake-up until it finds it empty.
        self._sendq: SendQueue = SendQueue(
            send_queue_bytes, timeout=send_timeout, describe=self._describe, loop=loop, idle=False
        )
        self._wake_fut: asyncio.Future | None = None
        self._paused = False
        self._resume_fut: asyncio.Future | None = None
        self._bad_data: str | None = None
        self._ended: asyncio.Future | None = None
        #: gRPC messages and SFM frames moved so far (batching shows as frames > messages).
        self.stats = {"messages_in": 0, "frames_in": 0, "messages_out": 0, "frames_out": 0}
        # Connection.__init__ went through the setter below; the handshake has not happened.
        self._ext_known = False

    # -- properties and extensions -------------------------------------------------------

    @property
    def extensions(self) -> frozenset[str]:  # type: ignore[override]
        return self._extensions

    @extensions.setter
    def extensions(self, value: frozenset[str]) -> None:
        # The core sets this once the handshake is done; until then a batch from the peer is
        # accepted if we offered batching (the peer may have seen our READY before we get here).
        self._extensions = frozenset(value)
        self._ext_known = True

    def offered_extensions(self) -> tuple[str, ...]:
        return self._offer

    def _describe(self) -> str:
        return f"connection {self.name} to {self._peer}"

    @property
    def _queue(self) -> Any:
        """The (message, envelope length) items queued and not yet written (tests, debugging)."""
        return self._sendq.items

    @property
    def _queued_bytes(self) -> int:
        return self._sendq.queued_bytes

    @property
    def _lock(self) -> Any:
        return self._sendq.lock

    @property
    def _closing(self) -> bool:
        return self._sendq.closed

    def get_conn_properties(self) -> dict:
        """``peer_addr`` as gRPC reports it (``ipv4:127.0.0.1:50051``), ``local_addr``, ``transport``
        (``grpc`` or ``grpcs``); on TLS also ``peer_cn``, ``tls_version``, ``tls_cipher`` (None:
        gRPC does not tell it) and ``identity_binding`` (see ``sfm_driver_grpc.tls``)."""
        return dict(self._props)

    # -- sending (any thread; the core serialises sends per connection) --------------------

    def send_frame(self, frame: Any) -> None:
        bufs = frame if isinstance(frame, list) else [frame]
        if self._sendq.closed:  # before the copy below
            raise CommError(CommError.CLOSED, f"{self._describe()} is closed")
        self._seq = next(self._seqs) & 0x7FFFFFFF
        data_len = sum(b.nbytes if isinstance(b, memoryview) else len(b) for b in bufs)
        env = wire.envelope(self._seq, data_len)
        msg = b"".join([env, *bufs])  # the one copy: gRPC needs one bytes object per message
        if self._sendq.put((msg, len(env)), len(msg)):
            try:
                self._loop.call_soon_threadsafe(self._wake_writer)
            except RuntimeError:  # loop closed under us: the connection is gone
                raise CommError(CommError.CLOSED, f"connection {self.name}: event loop is closed") from None

    def send_urgent(self, frame: bytes) -> bool:
        """Queue a small control frame (PING/PONG) ahead of the data frames (any thread, never blocks).

        It goes out as a gRPC message of its own as soon as the write in progress (if any)
        completes: the next frame boundary. False once the connection is closing.
        """
        if self._sendq.closed:
            return False
        seq = next(self._seqs) & 0x7FFFFFFF
        msg = wire.encode(seq, [frame])  # the Frame envelope, as send_frame makes it
        try:
            wake = self._sendq.put_urgent((msg, 0))
        except CommError:  # closing
            return False
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._wake_writer)
            except RuntimeError:  # loop closed under us: the connection is gone
                return False
        return True

    def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` s until every accepted frame was handed to gRPC; return how many were not.

        Queued frames count one each, a write in progress one more. On the loop thread it does
        not wait (the loop is the writer). Once closed, it returns the frames dropped unsent.
        """
        return self._sendq.drain(timeout)

    def _is_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _wake_writer(self) -> None:
        fut = self._wake_fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _write_loop(self) -> None:
        write = self._stream.write
        loop = self._loop
        stats = self.stats
        sendq = self._sendq
        while True:
            # Control frames first, each a message of its own; then the next data message: several
            # frames in one when batching is agreed and they fit in batch_bytes.
            batch_bytes = self._batch_bytes if BATCH_EXTENSION in self._extensions else 0
            batch = sendq.take(batch_bytes, measure=_data_len)
            if not batch:
                if sendq.closed:
                    return  # all written: the close goes on (a cancel here could cancel the call)
                fut = self._wake_fut = loop.create_future()
                await fut
                continue
            for msg, _ in batch.urgent:
                await write(msg)
                stats["messages_out"] += 1
                stats["frames_out"] += 1
            items = batch.items
            if len(items) == 1:
                await write(items[0][0])
            elif items:
                await write(wire.encode(self._seq & 0x7FFFFFFF, [memoryview(m)[e:] for m, e in items]))
            if items:
                stats["messages_out"] += 1
                stats["frames_out"] += len(items)
            if sendq.done(batch):
                # A sender waits for room, and the peer took a message: alive, only slow.
                receiver = self.frame_receiver
                if receiver is not None:
                    receiver.bytes_sent()

    # -- receiving (loop thread) -----------------------------------------------------------

    def _accept_batch(self) -> bool:
        if not self._offer:
            return False
        return not self._ext_known or BATCH_EXTENSION in self._extensions

    def split(self, message: bytes | memoryview) -> list:
        """The SFM frame(s) in one serialized ``Frame``; ``CommError(BAD_DATA)`` naming what is wrong."""
        return self._frames.split(wire.decode(message)[1], self._accept_batch())

    async def _read_loop(self) -> None:
        read = self._stream.read
        loop = self._loop
        stats = self.stats
        while True:
            if self._paused:
                fut = self._resume_fut = loop.create_future()
                if self._paused:
                    await fut
                self._resume_fut = None
                continue
            message = await read()
            if message is grpc.aio.EOF:
                log.debug("connection %s: peer %s ended the stream", self.name, self._peer)
                return
            frames = self.split(message)
            stats["messages_in"] += 1
            stats["frames_in"] += len(frames)
            self.process_frames(frames)

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        self._paused = False
        try:
            self._loop.call_soon_threadsafe(self._wake_reader)
        except RuntimeError:  # loop already closed: nothing to resume
            pass

    def _wake_reader(self) -> None:
        fut = self._resume_fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    # -- life --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the stream until it ends, fails or :meth:`close`; then tell the driver (loop thread)."""
        self._ended = self._loop.create_future()
        if self._sendq.closed:
            self._ended.set_result(None)
        reader = asyncio.ensure_future(self._guard(self._read_loop(), "receive"))
        writer = asyncio.ensure_future(self._guard(self._write_loop(), "send"))
        try:
            await asyncio.wait({reader, writer, self._ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._mark_closing()
            try:
                if not self._is_server and self._bad_data is None and not reader.done():
                    await self._end_gracefully(reader, writer)
                for task in (reader, writer):
                    task.cancel()
                await asyncio.gather(reader, writer, return_exceptions=True)
                await self._end_stream(self._bad_data)
            finally:
                # The core keeps cycles through this connection (its receiver, its lane) that
                # only the garbage collector frees; grpc.aio keeps its process-global poller
                # thread and fds while any of its objects lives, so let go of them now, even
                # when this task is cancelled again while cleaning up.
                self._stream = self._channel = None
                try:
                    self._driver.remove_connection(self)
                finally:
                    self.set_closed()

    async def _guard(self, coro: Any, what: str) -> None:
        # Errors are logged here and not kept in the task: an exception's traceback would hold
        # the stream (and so grpc.aio's global state) alive until the garbage collector runs.
        try:
            await coro
        except CommError as e:
            if e.code == CommError.BAD_DATA:
                self._bad_data = e.message
                log.warning("connection %s: closing, bad data from %s: %s", self.name, self._peer, e.message)
            else:
                log.info("connection %s to %s: %s failed: %s", self.name, self._peer, what, e)
        except grpc.aio.AioRpcError as e:
            log.info("connection %s to %s: %s failed: %s %s", self.name, self._peer, what, e.code().name, e.details())
        except asyncio.CancelledError:
            raise
        except Exception as e:  # e.g. a write after the peer ended the call
            log.info("connection %s to %s: %s failed: %s: %s", self.name, self._peer, what, type(e).__name__, e)

    async def _end_stream(self, bad: str | None) -> None:
        if self._is_server:
            if bad is not None:
                # The handler's return ends the RPC; say why in its status for the peer.
                self._stream.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                self._stream.set_details(f"sfm: {bad}"[:1000])
            return
        self._stream.cancel()
        if self._channel is not None:
            await self._channel.close()

    async def _end_gracefully(self, reader: asyncio.Future, writer: asyncio.Future) -> None:
        """Client side, a close of ours: let the writer finish its message, half-close, and
        wait (up to _GRACEFUL_CLOSE) for the server to end the call. Cancelling instead would
        drop what gRPC has taken from us but not yet delivered (stop() lost 740 of 2,000 so);
        cancelling a task inside read() or write() cancels the whole call."""
        self._wake_writer()
        try:
            await asyncio.wait_for(asyncio.shield(writer), _GRACEFUL_CLOSE)
            await self._stream.done_writing()
            await asyncio.wait_for(asyncio.shield(reader), _GRACEFUL_CLOSE)
        except (TimeoutError, grpc.aio.AioRpcError, grpc.aio.UsageError, RuntimeError) as e:
            log.debug("connection %s: no graceful end of the stream: %s", self.name, e)

    def _mark_closing(self) -> None:
        frames, nbytes, urgent = self._sendq.drop()
        if frames:
            log.warning(
                "connection %s to %s: closing with %d frame(s) (%d bytes) and %d control frame(s) not yet"
                " written: dropped unsent",
                self.name,
                self._peer,
                frames,
                nbytes,
                urgent,
            )

    def close(self) -> None:
        """End the stream (idempotent, any thread); the loop then calls ``remove_connection``."""
        if self._sendq.closed:
            return
        self._mark_closing()
        if self._is_loop_thread():
            self._set_ended()
            return
        try:
            self._loop.call_soon_threadsafe(self._set_ended)
        except RuntimeError:  # the loop is gone, so is the stream
            self._driver.remove_connection(self)
            self.set_closed()

    def _set_ended(self) -> None:
        fut = self._ended
        if fut is not None and not fut.done():
            fut.set_result(None)
