"""One driver connection as the core sees it: its session, the lock that orders its sends,
its control frames, and the receiver that takes its frames from the driver."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from functools import partial
from typing import TYPE_CHECKING, Any

from .delivery import Lane
from .driver import Connection, ConnState, FrameReceiver, Mode
from .errors import CommError
from .frame_writer import FrameWriter
from .frames import Payload
from .params import get_param
from .session import Session

if TYPE_CHECKING:
    from .conn_manager import ConnManager
    from .endpoint_table import SfmEndpoint

log = logging.getLogger(__name__)


class SfmConnection:
    """A driver :class:`Connection`, its :class:`Session`, and (for event-loop drivers) its lane.

    Frames are written by its :class:`FrameWriter`, in the order of their sequence numbers.
    Control frames (PING, PONG) never wait for a blocked sender: the driver takes them ahead
    of its queue (:meth:`Connection.send_urgent`), or the writer sends them right after the
    frame being written.
    """

    def __init__(self, conn: Connection, session: Session, mode: Mode, lane: Lane | None = None) -> None:
        self.conn = conn
        self.session = session
        self.mode = mode
        self.lane = lane
        self.sfm_endpoint: SfmEndpoint | None = None
        #: The driver reported it closed (set by the endpoint table, under its lock).
        self.lost = False
        #: The core decided to close it (bad data, a timeout, stop, ...).
        self.closing = False
        #: An inline driver's thread is delivering its frames right now (we are the slow one).
        self.rx_busy = False
        #: Orders and writes this connection's frames (``sfm_core/frame_writer.py``).
        self.writer = FrameWriter(conn, session, conn.name, stream_handoff=_stream_handoff(conn))
        #: ``send_data(app_id, stream_id, headers, payload)``: send one DATA frame as
        #: ``[head, *payload]``, the payload never copied (the writer's, bound to this session:
        #: one call less on every message).
        self.send_data: Callable[[int, int, dict | None, Payload | None], None] = partial(
            self.writer.send_data, session
        )

    @property
    def name(self) -> str:
        return self.conn.name

    def get_name(self) -> str:
        return self.conn.name

    def receiving(self) -> bool:
        """True while frames of this connection wait for, or are in, delivery."""
        lane = self.lane
        return self.rx_busy or (lane is not None and lane.busy)

    # -- sending -----------------------------------------------------------------------------

    def send_batch(
        self, app_id: int, stream_ids: Sequence[int], messages: Sequence[tuple[dict | None, Payload | None]]
    ) -> None:
        """Send several DATA frames in order under one hold of the write role: their heads are
        packed in one loop (every frame is checked before anything is sent) and, on a driver
        that has ``send_frames``, they go out in one call, the payloads not copied.
        ``stream_ids``: one per message."""
        writer = self.writer
        with writer.exclusive():
            bufs = self.session.data_frames(app_id, stream_ids, messages)
            writer.send_frames_locked(bufs, len(messages))

    def send(self, frame: Payload) -> None:
        """Send one encoded frame in turn with the data frames."""
        with self.writer.exclusive():
            self.writer.write(frame)

    def exclusive(self) -> AbstractContextManager[None]:
        """Hold the write role: frames written with :meth:`write_locked` in the block go out
        with no other frame between them; frames sent meanwhile follow."""
        return self.writer.exclusive()

    def write_locked(self, frame: Payload) -> None:
        """Send one encoded frame; the caller is in :meth:`exclusive`."""
        self.writer.write(frame)

    def send_control(self, frame: bytes) -> None:
        """Send a PING or PONG at the next frame boundary, without waiting for a blocked sender."""
        if self.conn.send_urgent(frame):
            return
        self.writer.send_control(frame)

    # -- closing -----------------------------------------------------------------------------

    def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for the frames already accepted to reach the transport;
        return how many had not (new DATA is refused once :meth:`Session.begin_close` ran)."""
        deadline = time.monotonic() + timeout
        left = self.writer.drain(timeout)
        if left:
            return left + self.conn.drain(0.0)  # a sender is stuck mid-frame, or frames still queue
        try:
            return self.conn.drain(max(0.0, deadline - time.monotonic()))
        except Exception:
            log.exception("drain failed on %s", self.conn.name)
            return 0

    def refuse(self, frame: bytes | None, wait: float = 1.0) -> None:
        """Send a refusal READY (if the peer may be told why), give it up to ``wait`` s to
        reach the transport, then close."""
        if frame is not None:
            try:
                self.send(frame)
                self.conn.drain(wait)
            except Exception as e:  # the peer may be gone already; it is being closed anyway
                log.debug("could not send the refusal on %s: %s", self.conn.name, e)
        self.close()

    def close(self) -> None:
        """Close the transport now (what is queued in the driver may be dropped)."""
        self.closing = True
        self.session.begin_close()
        self.writer.close()
        self.conn.close()


def _stream_handoff(conn: Connection) -> bool:
    """The connector's ``stream_handoff`` parameter (checked when it was added)."""
    connector = conn.connector
    if connector is None:
        return True
    try:
        scheme = str(connector.params.get("scheme", "sfm"))
        return bool(get_param(connector.params, "stream_handoff", bool, True, driver=scheme))
    except CommError:
        return True


def linger_on(sfm_conns: list[SfmConnection], linger: float, local_name: str) -> int:
    """Refuse new DATA on ``sfm_conns``, then wait up to ``linger`` s in all for what they
    accepted to reach the transport; log (WARNING) and return how many frames did not."""
    for sfm_conn in sfm_conns:
        sfm_conn.session.begin_close()
    deadline = time.monotonic() + linger
    dropped = 0
    for sfm_conn in sfm_conns:
        left = sfm_conn.drain(max(0.0, deadline - time.monotonic()))
        if left:
            dropped += left
            ep = sfm_conn.sfm_endpoint
            log.warning(
                "%s: %d frame(s) accepted for %s on %s still unsent after the %.1f s linger; closing drops them",
                local_name,
                left,
                ep.endpoint.name if ep else "an unnamed peer",
                sfm_conn.name,
                linger,
            )
    return dropped


class NullConnection(Connection):
    """The connection given to receivers of loopback messages (sent to ourselves)."""

    def __init__(self) -> None:
        super().__init__(None)
        self.state = ConnState.CONNECTED

    def get_conn_properties(self) -> dict:
        """Loopback has no transport properties."""
        return {}

    def close(self) -> None:
        """Nothing to close."""

    def send_frame(self, frame: Payload) -> None:
        """Loopback never sends frames."""
        raise CommError(CommError.NOT_SUPPORTED, "NullConnection does not send frames")


class SfmFrameReceiver(FrameReceiver):
    """Takes a connection's frames on the driver's I/O thread: delivers them right there
    (inline drivers) or queues them, in order, on the connection's lane."""

    def __init__(self, conn_manager: ConnManager, conn: SfmConnection) -> None:
        self.conn_manager = conn_manager
        self.conn = conn

    def process_frame(self, frame: Payload) -> None:
        """Take one frame."""
        self.process_frames((frame,))

    def bytes_received(self) -> None:
        """Part of a frame arrived: the peer is alive."""
        self.conn.session.heard(time.monotonic())

    def bytes_sent(self) -> None:
        """A waiting send moved on: the peer is reading."""
        self.conn.session.progressed(time.monotonic())

    def process_frames(self, frames: Sequence[Any]) -> None:
        """Take a batch of frames received together."""
        conn = self.conn
        conn.session.last_heard = time.monotonic()
        conn.writer.frames_arrived()
        lane = conn.lane
        if lane is not None:
            lane.submit(frames, sum(map(len, frames)))
            return
        conn.rx_busy = True
        writer = conn.writer
        writer.reader = threading.get_ident()  # replies sent from this delivery: see FrameWriter.reader
        try:
            self.conn_manager.process_frames_task(conn, frames, inline=True)
        finally:
            writer.reader = None
            conn.rx_busy = False
