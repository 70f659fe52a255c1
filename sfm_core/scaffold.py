"""``sfm new-driver NAME --scheme SCHEME [DIR]``: write a driver package that installs and passes
the conformance suite before its author writes a line (``docs/driver-authors.md``).

The package is sfm's Unix domain socket example (``docs/examples/sfm-driver-uds``) under another
name: distribution ``sfm-driver-NAME``, package ``sfm_driver_NAME``, class ``<Name>Driver``,
entry point ``SCHEME = "sfm_driver_NAME:<Name>Driver"`` in the group ``sfm.drivers``, tests whose
``conftest.py`` turns the suite on for SCHEME. Its author then replaces the transport and keeps
the suite passing.

The ``sfm`` command wires :func:`add_command` into its subcommands; ``python -m sfm_core.scaffold``
runs :func:`main` on its own. :func:`write_package` does the work for code.

The files are :data:`TEMPLATES`, the example's files with its names replaced by markers:
``@P@`` the package, ``@D@`` the distribution, ``@C@`` the driver class, ``@S@`` the scheme,
``@K@`` the scheme as a TOML key, ``@N@`` NAME (in paths). ``render("uds", "uds")`` gives the
example byte for byte (``tests/test_scaffold.py`` checks it): change both together.
"""

from __future__ import annotations

import argparse
import json
import keyword
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

DESCRIPTION = (
    "write a driver package (pyproject with the entry point, driver module, README, tests wired to "
    "the conformance suite) that installs and passes the suite as it is (docs/driver-authors.md)"
)

#: A URL scheme as RFC 3986 spells it, in lower case (sfm compares schemes in lower case).
SCHEME_RE = re.compile(r"[a-z][a-z0-9+.-]*")
_TOML_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class ScaffoldError(ValueError):
    """A NAME, SCHEME or DIR that ``sfm new-driver`` refuses; the message says why."""


def check_name(name: str) -> str:
    """NAME as given, or :class:`ScaffoldError`: an ASCII Python identifier, not a keyword, with a
    letter or digit (it becomes ``sfm_driver_NAME`` and the class ``<Name>Driver``)."""
    if not (name.isascii() and name.isidentifier()) or keyword.iskeyword(name) or not class_name(name):
        raise ScaffoldError(
            f"NAME {name!r} is not a valid Python identifier (ASCII letters, digits and underscores, not starting "
            f"with a digit, not a keyword): it becomes the package sfm_driver_NAME and the class <Name>Driver"
        )
    return name


def check_scheme(scheme: str) -> str:
    """SCHEME as given, or :class:`ScaffoldError`: a URL scheme (RFC 3986: a letter, then letters,
    digits, ``+``, ``-``, ``.``), in lower case."""
    if not SCHEME_RE.fullmatch(scheme):
        hint = (
            f"; sfm compares schemes in lower case: give {scheme.lower()!r}"
            if SCHEME_RE.fullmatch(scheme.lower())
            else ""
        )
        raise ScaffoldError(
            f"SCHEME {scheme!r} is not a URL scheme (RFC 3986: a lower-case letter, then letters, digits, "
            f"'+', '-' or '.'){hint}"
        )
    return scheme


def class_name(name: str) -> str:
    """``my_transport`` -> ``MyTransport`` (the driver class is this plus ``Driver``)."""
    return "".join(part[0].upper() + part[1:] for part in name.split("_") if part)


def default_directory(name: str) -> str:
    """Where the package goes when no DIR is given: ``./sfm-driver-NAME``."""
    return f"sfm-driver-{name.replace('_', '-')}"


def render(name: str, scheme: str) -> dict[str, str]:
    """The package's files, relative path to text, for NAME and SCHEME (both checked)."""
    check_name(name)
    check_scheme(scheme)
    marks = {
        "@P@": f"sfm_driver_{name}",
        "@D@": f"sfm-driver-{name.replace('_', '-')}",
        "@C@": f"{class_name(name)}Driver",
        "@S@": scheme,
        "@K@": scheme if _TOML_BARE_KEY.fullmatch(scheme) else json.dumps(scheme),
        "@N@": name,
    }
    pattern = re.compile("|".join(re.escape(m) for m in marks))
    return {
        pattern.sub(lambda m: marks[m.group()], path): pattern.sub(lambda m: marks[m.group()], text)
        for path, text in TEMPLATES.items()
    }


def check_directory(directory: str | os.PathLike[str]) -> Path:
    """DIR as a path, or :class:`ScaffoldError` if it exists and is not an empty directory."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise ScaffoldError(f"{str(path)!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        raise ScaffoldError(f"{str(path)!r} exists and is not empty: give a new or empty directory")
    return path


def write_package(directory: str | os.PathLike[str], name: str, scheme: str) -> list[Path]:
    """Write the package for NAME and SCHEME into ``directory`` (new, or empty); return the
    files written. :class:`ScaffoldError` for a bad NAME, SCHEME or DIR, before writing anything."""
    files = render(name, scheme)
    root = check_directory(directory)
    written = []
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def _claimed(scheme: str) -> str | None:
    """The distribution that serves ``scheme`` already, if any (a warning, not a refusal)."""
    try:
        from .registry import get_registry

        for entry in get_registry().entries():
            if entry.scheme == scheme:
                return entry.distribution
    except Exception:  # listing installed drivers must never stop the scaffold
        return None
    return None


def run(name: str, scheme: str, directory: str | None = None) -> int:
    """Write the package; 0, or 2 with the reason on stderr."""
    target = directory or default_directory(name)
    try:
        written = write_package(target, name, scheme)
    except ScaffoldError as e:
        print(f"sfm new-driver: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"sfm new-driver: cannot write {target}: {e.strerror or e}", file=sys.stderr)
        return 2
    claimed = _claimed(scheme)
    if claimed:
        print(
            f"sfm new-driver: note: {scheme}:// is served by {claimed} already; with both installed one shadows "
            f"the other (sfm drivers --why {scheme}, docs/plugins.md 'How a scheme is resolved')",
            file=sys.stderr,
        )
    print(f"wrote {len(written)} files to {target}/ (sfm-driver-{name.replace('_', '-')}, {scheme}://):")
    for path in written:
        print(f"  {path}")
    print(
        f"next:\n  cd {target}\n  pip install -e .          # the entry point makes {scheme}:// known\n"
        f"  pytest                    # its tests and the conformance suite\n"
        f"  sfm conformance {scheme}\n"
        "then replace the transport in the driver module and keep the suite passing (docs/driver-authors.md)"
    )
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="a Python identifier: the package is sfm_driver_NAME")
    p.add_argument("--scheme", required=True, metavar="SCHEME", help="the URL scheme the driver serves, e.g. uds")
    p.add_argument("directory", metavar="DIR", nargs="?", help="a new or empty directory (default ./sfm-driver-NAME)")


def _cmd(args: argparse.Namespace) -> int:
    return run(args.name, args.scheme, args.directory)


def add_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``new-driver`` to a command's subparsers (``sfm``'s); the parsed arguments'
    ``func(args)`` runs it and returns the exit code (2 for a refused NAME, SCHEME or DIR)."""
    p = subparsers.add_parser("new-driver", help=DESCRIPTION, description=DESCRIPTION)
    p.add_argument("-v", "--verbose", dest="sub_verbose", action="count", default=0, help=argparse.SUPPRESS)
    add_arguments(p)
    p.set_defaults(func=_cmd)
    _parse_intermixed(p)
    return p


def _parse_intermixed(parser: argparse.ArgumentParser) -> None:
    """Let DIR follow ``--scheme SCHEME`` (``NAME --scheme SCHEME DIR``): argparse's plain parsing
    gives both positionals out before the option and then refuses DIR. A subcommand's parser is
    run with ``parse_known_args``; this one runs intermixed instead (which calls the plain one)."""
    plain = parser.parse_known_args
    busy = False

    def parse_known_args(args=None, namespace=None):  # type: ignore[no-untyped-def]
        nonlocal busy
        if busy:
            return plain(args, namespace)
        busy = True
        try:
            return parser.parse_known_intermixed_args(args, namespace)
        finally:
            busy = False

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sfm_core.scaffold NAME --scheme SCHEME [DIR]``."""
    ap = argparse.ArgumentParser(prog="sfm new-driver", description=DESCRIPTION)
    add_arguments(ap)
    args = ap.parse_intermixed_args(argv)
    return run(args.name, args.scheme, args.directory)


#: The package's files (relative path with markers -> text with markers): the example's files.
TEMPLATES: dict[str, str] = {
    "README.md": """# @D@

An sfm transport driver for the URL scheme `@S@://`. As written, it is
sfm's Unix domain socket example (under `docs/examples/` in sfm's repository, explained
step by step in its `docs/driver-authors.md`), the standard library only: a listener on
`@S@:///path/to/socket`, a thread per connection, sfm's `FrameDecoder`, declared parameters,
a clean shutdown that removes the socket file. `sfm new-driver` writes the same package under
another name, so a new driver starts from one that passes the conformance suite; replace the
transport in `@P@/driver.py` and keep the suite passing.

## Install, check, use

```sh
pip install -e .                  # the entry point makes @S@:// known to sfm
sfm drivers                       # lists @S@ with its capabilities
pytest                            # this package's tests and sfm's conformance suite
sfm conformance @S@               # the suite alone (or: python -m sfm_core.testing @S@)
```

```python
from sfm_core import ConnManager, Endpoint, Mode

server = ConnManager(Endpoint("server"))
server.add_connector("@S@:///tmp/sfm-demo.sock", {}, Mode.PASSIVE)
server.start()
client = ConnManager(Endpoint("site-1"))
client.add_connector("@S@:///tmp/sfm-demo.sock", {}, Mode.ACTIVE)
client.start()
```

## URLs and parameters

`@S@:///absolute/path/to/socket`: three slashes, the path percent-encoded where it needs it
(`@S@:///tmp/my%20app.sock`). Parameters, in the URL's query or the connector's params:

| parameter | side | default | meaning |
|---|---|---|---|
| `send_timeout` | both | 60 | seconds a send may make no progress before the connection is closed |
| `connect_timeout` | active | 10 | seconds a connect may wait (only while the listener's backlog is full) |
| `backlog` | listener | 128 | listen backlog |
| `socket_mode` | listener | (umask) | permissions of the socket file, in octal (`660`): who may connect |

and sfm's own: `max_frame_size`, a listener's `max_connections` and `max_handshakes`. A socket
file left by a listener that crashed is replaced; one another listener uses is refused, and a
file that is not a socket is never removed. The connection properties are `peer_addr`,
`local_addr` and, on Linux, the peer's `peer_pid`, `peer_uid` and `peer_gid`.

There is no TLS: a Unix socket never leaves the machine, and the file's permissions say who may
connect.
""",
    "pyproject.toml": """[build-system]
# 77: the first to take project.license as an SPDX expression (PEP 639).
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "@D@"
version = "0.1.0"
description = "Unix domain socket driver for sfm (@S@:///path/to/socket)"
readme = "README.md"
requires-python = ">=3.11"
license = "Apache-2.0"
dependencies = ["sfm-core>=0.1"]

[project.optional-dependencies]
test = ["pytest>=8"]

# The entry point's name is the URL scheme; the value is the Driver subclass.
[project.entry-points."sfm.drivers"]
@K@ = "@P@:@C@"

[tool.setuptools.packages.find]
include = ["@P@*"]

[tool.setuptools.package-data]
@P@ = ["py.typed"]

[tool.pytest.ini_options]
testpaths = ["tests"]

[tool.ruff]
line-length = 120
target-version = "py311"

[tool.ruff.lint]
select = ["E", "F", "W", "I", "B", "UP", "RUF"]
""",
    "@P@/__init__.py": '''"""@D@: Unix domain sockets for sfm (``@S@:///path/to/socket``)."""

from .driver import @C@

__all__ = ["@C@"]
__version__ = "0.1.0"
''',
    "@P@/driver.py": '''"""A driver for Unix domain sockets, with the standard library only: sfm frames back to back
on a stream socket, a thread per connection. URLs: ``@S@:///path/to/socket``.

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

SCHEME = "@S@"
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
    (``@S@:///tmp/my%20app.sock`` is ``/tmp/my app.sock``)."""
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
    """The URL of a socket file: ``@S@:///tmp/sfm.sock``."""
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


class @C@(Driver):
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
''',
    "@P@/py.typed": """""",
    "tests/conftest.py": """# Turns sfm's driver conformance suite on for the scheme below, beside this package's own
# tests (docs/conformance.md in sfm). The driver must be installed first: pip install -e .
sfm_conformance_scheme = "@S@"
""",
    "tests/test_@N@.py": '''"""This driver's own checks, beside the conformance suite (which conftest.py turns on)."""

import os
import socket
import stat
import tempfile

import pytest
from sfm_core import CommError, ConnManager, Endpoint, Mode, get_registry

from @P@.driver import SCHEME, @C@


@pytest.fixture
def tmp():
    with tempfile.TemporaryDirectory(prefix="sfmt-") as directory:  # short: socket paths are limited
        yield directory


def listen(url: str, **params) -> tuple[ConnManager, str]:
    manager = ConnManager(Endpoint("server"))
    handle = manager.add_connector(url, params, Mode.PASSIVE)
    manager.start()
    try:
        return manager, manager.wait_listening(handle, 10)
    except CommError:
        manager.stop()
        raise


def test_the_scheme_is_served_by_this_driver():
    assert isinstance(get_registry().create_driver(SCHEME), @C@)


@pytest.mark.parametrize("url", [f"{SCHEME}://0:0", f"{SCHEME}://tmp/x.sock", f"{SCHEME}://"])
def test_a_url_without_a_socket_path_is_refused(url):
    with pytest.raises(CommError) as e:
        ConnManager(Endpoint("server")).add_connector(url, {}, Mode.PASSIVE)
    assert e.value.code == CommError.BAD_CONFIG
    assert "three slashes" in str(e.value)


def test_a_path_too_long_is_refused():
    with pytest.raises(CommError, match="longer than"):
        ConnManager(Endpoint("server")).add_connector(f"{SCHEME}:///{'x' * 200}", {}, Mode.PASSIVE)


def test_listening_reports_the_path_and_removes_the_file_at_stop(tmp):
    path = os.path.join(tmp, "my app.sock")
    manager, url = listen(f"{SCHEME}://{path.replace(' ', '%20')}", socket_mode="600")
    try:
        assert url == f"{SCHEME}://{path.replace(' ', '%20')}"
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        manager.stop()
    assert not os.path.exists(path)


def test_a_stale_socket_file_is_replaced_and_one_in_use_refused(tmp):
    path = os.path.join(tmp, "sfm.sock")
    crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    crashed.bind(path)  # a listener that died without removing its file
    crashed.close()
    manager, _url = listen(f"{SCHEME}://{path}")
    try:
        with pytest.raises(CommError, match="in use"):
            listen(f"{SCHEME}://{path}")
        assert stat.S_ISSOCK(os.stat(path).st_mode), "the second listener removed the first one's file"
    finally:
        manager.stop()


def test_a_file_that_is_not_a_socket_is_left_alone(tmp):
    path = os.path.join(tmp, "precious.txt")
    with open(path, "w") as f:
        f.write("keep me")
    with pytest.raises(CommError, match="cannot listen"):
        listen(f"{SCHEME}://{path}")
    with open(path) as f:
        assert f.read() == "keep me"


def test_a_bad_socket_mode_is_refused():
    with pytest.raises(CommError, match="socket_mode"):
        ConnManager(Endpoint("server")).add_connector(f"{SCHEME}:///tmp/x.sock?socket_mode=999", {}, Mode.PASSIVE)
''',
}


if __name__ == "__main__":
    sys.exit(main())
