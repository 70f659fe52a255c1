"""A driver for Unix domain sockets, with the standard library only: sfm frames back to back
on a stream socket, a thread per connection. URLs: ``uds:///path/to/socket``.

The tutorial that writes it step by step is sfm's ``docs/driver-authors.md``; ``sfm new-driver``
writes this very package under a name of your choosing.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import stat
import struct
import sys
import threading
from typing import Any
from urllib.parse import quote, unquote

from sfm_core import CommError, Connection, ConnectorInfo, Driver, Mode
from sfm_core.driver_params import ACTIVE, PASSIVE, Param, parse_params
from sfm_core.frames import HANDSHAKE_MAX_FRAME, MAX_FRAME_SIZE, FrameDecoder, Payload

log = logging.getLogger(__name__)

SCHEME = "uds"
DRIVER_NAME = f"{SCHEME} driver"
#: The longest socket path the kernel takes, in bytes (``sun_path`` less its NUL).
MAX_PATH_BYTES = 107 if sys.platform.startswith("linux") else 103
#: At most this many buffers go to one ``sendmsg`` call (the kernel's IOV_MAX is 1024).
IOV_MAX = 512
#: accept() errors that mean "out of resources": retrying at once would spin.
RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

# -- step 2: parameters ---------------------------------------------------------------------

#: This driver's connector parameters. The core's own (``path``, ``max_frame_size``, a
#: listener's ``max_connections``, ...) need no declaring: sfm_core.driver_params.CORE_PARAMS.
PARAMS = (
    Param("send_timeout", float, 60.0, minimum=0.001, doc="seconds a send may make no progress"),
    Param("connect_timeout", float, 10.0, minimum=0.001, modes=(ACTIVE,), doc="seconds to connect"),
    Param("backlog", int, 128, minimum=1, modes=(PASSIVE,), doc="listen backlog"),
    Param("socket_mode", str, None, modes=(PASSIVE,), doc="permissions of the socket file in octal, e.g. 660"),
)


def parse(params: dict, mode: Mode) -> dict[str, Any]:
    """Every parameter of a connector, typed, with defaults; ``CommError(BAD_CONFIG)`` names
    every mistake. Adds ``socket_path`` (the file) and turns ``socket_mode`` into an int."""
    p = parse_params(PARAMS, params, mode, driver=DRIVER_NAME)
    p["socket_path"] = socket_path(p)
    if p["socket_mode"] is not None:
        try:
            p["socket_mode"] = int(p["socket_mode"], 8)
        except ValueError:
            p["socket_mode"] = -1
        if not 0 <= p["socket_mode"] <= 0o777:
            raise CommError(
                CommError.BAD_CONFIG, f"{DRIVER_NAME}: socket_mode={params['socket_mode']!r} is not octal 000..777"
            )
    return p


def socket_path(p: dict[str, Any]) -> str:
    """The socket file a connector names: the URL's path, percent-decoded
    (``uds:///tmp/my%20app.sock`` is ``/tmp/my app.sock``)."""
    path = p["path"]
    if p["host"] not in (None, "localhost") or p["port"] is not None or not path:
        raise CommError(
            CommError.BAD_CONFIG,
            f"{DRIVER_NAME}: {p['url'] or p['scheme']!r} names no socket file; "
            f"give {p['scheme']}:///absolute/path/to/socket (three slashes)",
        )
    path = unquote(path)
    if len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise CommError(
            CommError.BAD_CONFIG,
            f"{DRIVER_NAME}: socket path {path!r} is longer than the {MAX_PATH_BYTES} bytes the kernel takes",
        )
    return path


def socket_url(scheme: str, path: str) -> str:
    """The URL of a socket file: ``uds:///tmp/sfm.sock``."""
    return f"{scheme}://{quote(path)}"


# -- step 3: a connection --------------------------------------------------------------------


class StreamConnection(Connection):
    """One connected socket. Its own thread reads it (:meth:`run`) and hands the frames to the
    core right there (``inline_delivery``); any thread sends (:meth:`send_frame`)."""

    inline_delivery = True  # the reading thread serves this connection only

    def __init__(self, sock: socket.socket, connector: ConnectorInfo, max_frame_size: int, send_timeout: float):
        super().__init__(connector)
        self.sock = sock
        self.max_frame_size = max_frame_size
        sock.settimeout(send_timeout)  # how long one send (or an idle read) may wait
        self.closed = False
        self._fd_lock = threading.Lock()  # the socket is closed only between two sends
        self._props = _properties(sock)

    def get_conn_properties(self) -> dict:
        return dict(self._props)

    def close(self) -> None:
        """Idempotent, from any thread: wakes the reading thread (its ``recv`` returns b""),
        which then closes the socket and reports the end."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def send_frame(self, frame: Payload) -> None:
        """Write the whole frame before returning (so the caller may reuse its buffers), with
        ``sendmsg`` (no copy). Blocks while the peer does not read: that is the backpressure."""
        parts = [frame] if isinstance(frame, (bytes, bytearray, memoryview)) else frame
        views = [v for v in (memoryview(b).cast("B") for b in parts) if v.nbytes]
        with self._fd_lock:
            if self.closed:
                raise CommError(CommError.CLOSED, f"connection {self.name} is closed")
            waited = False
            while views:
                try:
                    sent = self.sock.sendmsg(views[:IOV_MAX])
                except TimeoutError:
                    self.close()  # half a frame went out: this stream cannot go on
                    raise CommError(CommError.TIMEOUT, f"connection {self.name}: send made no progress") from None
                except OSError as e:
                    self.close()
                    raise CommError(CommError.CLOSED, f"connection {self.name}: {e.strerror or e}") from None
                if waited and self.frame_receiver is not None:
                    self.frame_receiver.bytes_sent()  # a slow peer is still a live one
                while sent:
                    if sent >= views[0].nbytes:
                        sent -= views.pop(0).nbytes
                    else:
                        views[0], sent = views[0][sent:], 0
                waited = bool(views)  # the socket is full: the next sendmsg waits

    def run(self) -> None:
        """Read until the connection ends: bytes into the decoder's buffer, whole frames to the
        core. Call it only after ``add_connection`` (the core's receiver is registered then)."""
        decoder = FrameDecoder(self.max_frame_size, first_frame_max=HANDSHAKE_MAX_FRAME)
        while not self.closed:
            try:
                n = self.sock.recv_into(decoder.get_buffer())
            except TimeoutError:
                continue  # idle: the core's heartbeats find a dead peer
            except OSError as e:
                log.info("connection %s: %s", self.name, e)
                return
            if n == 0:
                return  # the peer closed, or close() shut the socket down
            try:
                frames = decoder.buffer_updated(n)
                if frames:
                    self.process_frames(frames)
                elif decoder.pending and self.frame_receiver is not None:
                    self.frame_receiver.bytes_received()  # part of a large frame
            except CommError as e:  # a bad frame: close this connection only
                log.warning("connection %s: closing, bad data from %s: %s", self.name, self._props["peer_addr"], e)
                return

    def release(self) -> None:
        """Close the socket (once the reading thread is done with it)."""
        self.close()
        with self._fd_lock:  # a send in progress fails at once after the shutdown above
            self.sock.close()


def _properties(sock: socket.socket) -> dict[str, Any]:
    """``peer_addr`` and ``local_addr`` (the socket file, or ``unnamed`` for a connecting
    socket), and on Linux the peer's process and user (``SO_PEERCRED``)."""
    props: dict[str, Any] = {}
    try:
        props["local_addr"] = sock.getsockname() or "unnamed"
        props["peer_addr"] = sock.getpeername() or "unnamed"
        if hasattr(socket, "SO_PEERCRED"):
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            props["peer_pid"], props["peer_uid"], props["peer_gid"] = struct.unpack("3i", creds)
            if props["peer_addr"] == "unnamed":
                props["peer_addr"] = f"pid {props['peer_pid']}"
    except OSError:  # the peer is gone already; the first read will say so
        props.setdefault("local_addr", "unnamed")
        props.setdefault("peer_addr", "unnamed")
    return props


# -- step 4: the driver ----------------------------------------------------------------------


class UdsDriver(Driver):
    """Unix domain sockets. Params (:data:`PARAMS`): ``send_timeout``, ``connect_timeout``
    (active), ``backlog`` and ``socket_mode`` (listener); and the core's: the URL's path is the
    socket file, ``max_frame_size``, a listener's ``max_connections`` and ``max_handshakes``."""

    #: The driver contract this driver is written for (docs/plugins.md).
    SFM_DRIVER_CONTRACT = 1

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._stopping = False
        self._wakers: list[socket.socket] = []  # one per listen(): a byte on it wakes the accept loop
        self._open: set[StreamConnection] = set()  # every connection not yet ended, added or not

    @staticmethod
    def supported_transports() -> list[str]:
        return [SCHEME]

    @staticmethod
    def capabilities() -> dict[str, Any]:
        return {
            "max_frame_size": MAX_FRAME_SIZE,
            "tls": False,
            "io": "a thread per connection",
            # How the conformance suite (and `sfm demo`) listen on a free address.
            "listen_url": "{scheme}://{tmpdir}/sfm.sock",
        }

    @classmethod
    def parameters(cls) -> tuple[Param, ...]:
        return PARAMS

    def validate(self, params: dict, mode: Mode) -> None:
        parse(params, mode)

    # -- listening ----------------------------------------------------------------------------

    def listen(self, connector: ConnectorInfo) -> None:
        p = parse(connector.params, connector.mode)
        path = p["socket_path"]
        sock, ident = _bind(path, p["backlog"], p["socket_mode"])
        wake_r, wake_w = socket.socketpair()
        selector = selectors.DefaultSelector()
        try:
            with self._lock:
                if self._stopping:
                    raise CommError(CommError.CLOSED, f"{DRIVER_NAME} was shut down; use a new driver instance")
                self._wakers.append(wake_w)
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            selector.register(wake_r, selectors.EVENT_READ)
            connector.listening(socket_url(p["scheme"], path))
            log.info("%s: listening on %s", DRIVER_NAME, path)
            while True:
                ready = {key.fileobj for key, _ in selector.select()}
                if wake_r in ready:
                    return  # shutdown()
                self._accept(sock, connector, p, selector)
        finally:
            with self._lock:
                if wake_w in self._wakers:
                    self._wakers.remove(wake_w)
            selector.close()
            wake_r.close()
            wake_w.close()
            _unlink_if_ours(path, ident)
            sock.close()

    def _accept(self, sock: socket.socket, connector: ConnectorInfo, p: dict, selector: selectors.BaseSelector) -> None:
        try:
            client, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("%s: accept on %s failed: %s", DRIVER_NAME, p["socket_path"], e)
            if e.errno in RESOURCE_ERRORS:
                selector.select(0.1)  # back off, but wake at once for shutdown()
            return
        slot = connector.admit(p["socket_path"])  # the listener's limits, before anything else
        if slot is None:
            client.close()  # full: the limit logs why
            return
        try:
            conn = self._new_connection(client, connector, p)
        except CommError:
            slot.release()
            return
        conn.slot = slot
        try:
            threading.Thread(target=self._serve, args=(conn,), name=f"sfm-{SCHEME}-{conn.name}", daemon=True).start()
        except RuntimeError as e:  # no thread to be had
            log.warning("%s: dropping a connection: %s", DRIVER_NAME, e)
            conn.release()
            self.remove_connection(conn)
            self._forget(conn)

    # -- connecting ----------------------------------------------------------------------------

    def connect(self, connector: ConnectorInfo) -> None:
        p = parse(connector.params, connector.mode)
        path = p["socket_path"]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(p["connect_timeout"])  # a connect waits only while the listener's backlog is full
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise CommError(CommError.CLOSED, f"{DRIVER_NAME}: cannot connect to {path}: {e.strerror or e}") from None
        self._serve(self._new_connection(sock, connector, p))  # until the connection ends

    # -- both sides ----------------------------------------------------------------------------

    def _new_connection(self, sock: socket.socket, connector: ConnectorInfo, p: dict) -> StreamConnection:
        with self._lock:
            if self._stopping:
                sock.close()
                raise CommError(CommError.CLOSED, f"{DRIVER_NAME} was shut down")
            conn = StreamConnection(sock, connector, p["max_frame_size"], p["send_timeout"])
            self._open.add(conn)
        return conn

    def _serve(self, conn: StreamConnection) -> None:
        """A connection's life, on its own thread: report it, read it, report its end."""
        try:
            # The core registers its frame receiver now, and on the active side sends HELLO
            # from this very thread: the connection can send already, and reads only after.
            if self.add_connection(conn):
                conn.run()
        except Exception:
            log.exception("connection %s failed", conn.name)
        finally:
            conn.release()
            self.remove_connection(conn)  # also for a connection that never got added: its slot
            self._forget(conn)

    def _forget(self, conn: StreamConnection) -> None:
        with self._lock:
            self._open.discard(conn)

    def shutdown(self) -> None:
        """From another thread, while listen()/connect() block: wake the accept loops, close
        every connection (their threads then end, and connect() returns)."""
        with self._lock:
            self._stopping = True
            for waker in self._wakers:
                with contextlib.suppress(OSError):
                    waker.send(b"x")
            conns = list(self._open)
        for conn in conns:
            conn.close()
        super().shutdown()


def _bind(path: str, backlog: int, mode: int | None) -> tuple[socket.socket, tuple[int, int]]:
    """A listening socket on ``path`` and the file's identity. A socket file that nobody
    listens on any more (its listener crashed) is replaced; one in use, or a file that is not
    a socket, is refused."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(path)
        except OSError as e:
            if e.errno != errno.EADDRINUSE or not _stale(path):
                raise
            os.unlink(path)
            sock.bind(path)
        if mode is not None:
            os.chmod(path, mode)
        sock.listen(backlog)
        st = os.stat(path)
    except OSError as e:
        sock.close()
        raise CommError(CommError.ERROR, f"{DRIVER_NAME}: cannot listen on {path}: {e.strerror or e}") from None
    except BaseException:
        sock.close()
        raise
    return sock, (st.st_dev, st.st_ino)


def _stale(path: str) -> bool:
    """True if ``path`` is a socket file nobody listens on."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return False


def _unlink_if_ours(path: str, ident: tuple[int, int]) -> None:
    """Remove the socket file, unless another listener has put its own there since."""
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == ident:
            os.unlink(path)
