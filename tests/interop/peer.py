"""Test-side driver of a real NVFlare endpoint running in its own venv.

``NvflarePeer`` starts ``nvflare_peer.py`` with the nvflare venv's python (see
``nvflare_env.py``) and talks to it over JSON lines (protocol documented in
``nvflare_peer.py``).  Example::

    from peer import NvflarePeer, free_port

    with NvflarePeer("server", app_ids=[1]) as srv, NvflarePeer("site-1", app_ids=[1]) as cli:
        url = srv.listen("tcp")                  # passive connector on a free loopback port
        srv.start()
        cli.add_connector(url, "active")
        cli.start()
        srv.wait_for_state("site-1", "READY")
        cli.send("server", 1, {"k": b"\\x00"}, b"hello")
        [m] = srv.wait_for_messages(1)
        assert m.payload == b"hello" and m.headers == {"k": b"\\x00"}

Everything is cleaned up on ``close()`` / leaving the ``with`` block: the child
is asked to stop, then killed if needed, the reader thread is joined, pipes
are closed and the stderr temp file is deleted.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import pathlib
import queue
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from typing import Any

import json_tags

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # tests/helpers.py
    sys.path.append(str(HERE.parent))
from helpers import scaled  # noqa: E402  (every timeout below is scaled where it is used)

PEER_SCRIPT = HERE / "nvflare_peer.py"

_EOF = object()


class NvflarePeerError(RuntimeError):
    """A command failed, timed out, or the peer process died (message has stderr tail)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (bind to port 0, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---- tagged JSON encoding, the same as in nvflare_peer.py -------------------------------
def to_json(v: Any) -> Any:
    return json_tags.to_json(v, strict=True)


def from_json(v: Any) -> Any:
    return json_tags.from_json(v, strict=False)  # an undecodable value keeps its tag


@dataclasses.dataclass
class PeerMessage:
    """A message that the NVFlare peer's receiver got."""

    sender: str
    app_id: int
    headers: dict | None
    payload: bytes | None  # None when nvflare delivered None (also for an empty payload)
    payload_type: str  # type name nvflare handed to the receiver: "bytes", "bytearray", "NoneType"
    payload_len: int | None
    payload_sha256: str | None
    raw: dict  # the event as received (payload_b64 removed)


class NvflarePeer:
    """A real NVFlare ``Communicator`` in a subprocess; see the module docstring."""

    def __init__(
        self,
        name: str,
        *,
        app_ids: Iterable[int] = (1,),
        echo: int | None = None,
        properties: dict | None = None,
        heartbeat: float | None = None,
        log_level: str = "WARNING",
        log_events: str | None = None,
        payload_in_events: bool = True,
        python: os.PathLike | None = None,
        startup_timeout: float = 60.0,
        command_timeout: float = 30.0,
        env: dict | None = None,
    ):
        if python is None:
            from nvflare_env import ensure_nvflare_venv  # same directory

            python = ensure_nvflare_venv()
        self.name = name
        self.command_timeout = command_timeout
        self._replies: queue.Queue[Any] = queue.Queue()
        self._cond = threading.Condition()
        self._events: list[dict] = []
        self._messages: list[PeerMessage] = []
        self._msg_cursor = 0
        self._eof = False
        self._cmd_lock = threading.Lock()
        self._closed = False
        self._cmd_id = 0
        self._reader: threading.Thread | None = None
        self.proc: subprocess.Popen | None = None

        argv = [str(python), "-u", str(PEER_SCRIPT), "--name", name, "--log-level", log_level]
        if log_events:
            argv += ["--log-events", log_events]
        app_ids = list(app_ids)
        if app_ids:
            argv += ["--app-ids", ",".join(str(int(a)) for a in app_ids)]
        if echo is not None:
            argv += ["--echo", str(int(echo))]
        if properties:
            argv += ["--props-json", json.dumps(to_json(properties))]
        if heartbeat is not None:
            argv += ["--heartbeat", repr(float(heartbeat))]
        if not payload_in_events:
            argv.append("--no-payload-in-events")
        self.argv = argv

        fd, path = tempfile.mkstemp(prefix=f"nvflare-peer-{name}-", suffix=".stderr")
        self._stderr_path = path
        self._stderr_file = os.fdopen(fd, "wb")
        child_env = dict(os.environ)
        child_env.pop("PYTHONPATH", None)  # never leak our packages into nvflare's venv
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        if env:
            child_env.update(env)
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr_file,
                cwd=tempfile.gettempdir(),
                env=child_env,
                close_fds=True,
            )
            self._reader = threading.Thread(target=self._read_loop, name=f"nvflare-peer-{name}-reader", daemon=True)
            self._reader.start()
            self.ready_event = self._wait_event(lambda e: e.get("event") == "ready", startup_timeout, "startup")
        except BaseException:
            self.close()
            raise

    # ---- context manager ------------------------------------------------------------
    def __enter__(self) -> NvflarePeer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc else None
        return f"NvflarePeer({self.name!r}, pid={pid})"

    # ---- reader ----------------------------------------------------------------------
    def _read_loop(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        out = self.proc.stdout
        try:
            for raw in iter(out.readline, b""):
                try:
                    obj = json.loads(raw)
                except ValueError:
                    obj = {"event": "garbage", "line": raw[:200].decode(errors="replace")}
                if "reply" in obj:
                    self._replies.put(obj)
                    continue
                with self._cond:
                    if obj.get("event") == "message":
                        self._messages.append(self._to_message(obj))
                    self._events.append(obj)
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass  # pipe closed under us during close()
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()
            self._replies.put(_EOF)

    @staticmethod
    def _to_message(ev: dict) -> PeerMessage:
        b64 = ev.pop("payload_b64", None)
        payload = None if b64 is None else base64.b64decode(b64)
        return PeerMessage(
            sender=ev.get("from"),
            app_id=ev.get("app_id"),
            headers=from_json(ev.get("headers")),
            payload=payload,
            payload_type=ev.get("payload_type"),
            payload_len=ev.get("payload_len"),
            payload_sha256=ev.get("payload_sha256"),
            raw=ev,
        )

    # ---- diagnostics -----------------------------------------------------------------
    def stderr_tail(self, n: int = 4000) -> str:
        try:
            with open(self._stderr_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - n))
                return f.read().decode(errors="replace")
        except OSError:
            return "<stderr not available>"

    def _error(self, what: str) -> NvflarePeerError:
        rc = self.proc.poll() if self.proc else None
        status = "running" if rc is None else f"exited with {rc}"
        return NvflarePeerError(
            f"nvflare peer {self.name!r} ({status}): {what}\n--- peer stderr tail ---\n{self.stderr_tail()}"
        )

    # ---- events ----------------------------------------------------------------------
    @property
    def events(self) -> list:
        with self._cond:
            return list(self._events)

    @property
    def messages(self) -> list:
        """All messages received so far (including ones already returned by wait_for_messages)."""
        with self._cond:
            return list(self._messages)

    def state_events(self, name: str | None = None) -> list:
        with self._cond:
            return [
                e for e in self._events if e.get("event") == "state" and (name is None or e.get("endpoint") == name)
            ]

    def _wait_event(self, pred, timeout: float, what: str, start: int = 0) -> dict:
        timeout = scaled(timeout)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self._events[start:]:
                    if pred(e):
                        return e
                if self._eof:
                    raise self._error(f"process ended while waiting for {what}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._error(f"timed out after {timeout}s waiting for {what}")
                self._cond.wait(left)

    def wait_for_state(self, name: str, state: str = "READY", timeout: float = 15.0, since: int = 0) -> dict:
        """Wait for a state event ``{"endpoint": name, "state": state}``; events already
        received count (from index ``since`` of ``events``).  Returns the event."""
        return self._wait_event(
            lambda e: e.get("event") == "state" and e.get("endpoint") == name and e.get("state") == state,
            timeout,
            f"endpoint {name!r} to become {state}",
            start=since,
        )

    def log_events(self, since: int = 0) -> list:
        """The ``log`` events (``log_events=LEVEL``) from index ``since`` of ``events``."""
        with self._cond:
            return [e for e in self._events[since:] if e.get("event") == "log"]

    def wait_for_log(self, pattern: str, timeout: float = 15.0, since: int = 0) -> dict:
        """Wait for a ``log`` event (needs ``log_events=LEVEL``) whose message matches the
        regular expression ``pattern`` (``re.search``); returns the event."""
        rx = re.compile(pattern)
        return self._wait_event(
            lambda e: e.get("event") == "log" and rx.search(e.get("message", "")) is not None,
            timeout,
            f"a log record matching {pattern!r}",
            start=since,
        )

    def wait_for_messages(self, n: int, timeout: float = 15.0) -> list:
        """Wait until ``n`` not yet returned messages are there; return them (in arrival
        order, which NVFlare does not keep equal to send order) and consume them."""
        timeout = scaled(timeout)
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._messages) - self._msg_cursor < n:
                if self._eof:
                    raise self._error(
                        f"process ended while waiting for {n} messages (have {len(self._messages) - self._msg_cursor})"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._error(
                        f"timed out after {timeout}s waiting for {n} messages "
                        f"(have {len(self._messages) - self._msg_cursor})"
                    )
                self._cond.wait(left)
            out = self._messages[self._msg_cursor : self._msg_cursor + n]
            self._msg_cursor += n
            return out

    # ---- commands --------------------------------------------------------------------
    def command(self, cmd: str, timeout: float | None = None, **fields) -> dict:
        """Send one command, return its reply; raise NvflarePeerError unless ok."""
        if self._closed or self.proc is None:
            raise NvflarePeerError(f"nvflare peer {self.name!r} is closed")
        timeout = scaled(self.command_timeout if timeout is None else timeout)
        with self._cmd_lock:
            self._cmd_id += 1
            cid = self._cmd_id
            line = json.dumps(dict(fields, cmd=cmd, id=cid), separators=(",", ":")).encode() + b"\n"
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(line)
                self.proc.stdin.flush()
            except (OSError, ValueError) as e:
                raise self._error(f"cannot send command {cmd!r}: {e}") from None
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                try:
                    reply = self._replies.get(timeout=max(0.0, left))
                except queue.Empty:
                    raise self._error(f"no reply to {cmd!r} within {timeout}s") from None
                if reply is _EOF:
                    self._replies.put(_EOF)  # keep it for later callers
                    raise self._error(f"process ended before replying to {cmd!r}")
                if reply.get("id") != cid:
                    continue  # stale reply of an earlier timed-out command
                break
        if not reply.get("ok"):
            raise self._error(f"command {cmd!r} failed: {reply.get('error')}")
        return reply

    def add_connector(
        self, url: str, mode: str = "active", *, resources: dict | None = None, secure: bool = False
    ) -> str:
        """Add a connector (mode "active" or "passive"); returns NVFlare's handle.
        NVFlare cannot listen on port 0 usefully: give a real port (see ``listen``).

        ``resources`` are driver params handed to ``Communicator.add_connector`` (TLS:
        ``ca_cert``, ``server_cert``, ``server_key``, ``client_cert``, ``client_key`` as PEM
        paths, ``connection_security``); a secure scheme (``stcp``, ``grpcs``, ``https``)
        turns TLS on, ``secure=True`` does on a plain one."""
        return self.command("add_connector", url=url, mode=mode, secure=bool(secure), resources=to_json(resources))[
            "handle"
        ]

    def listen(
        self,
        scheme: str = "tcp",
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        resources: dict | None = None,
        secure: bool = False,
    ) -> str:
        """Add a passive connector on a free port; returns the URL for active peers."""
        url = f"{scheme}://{host}:{port or free_port(host)}"
        self.add_connector(url, "passive", resources=resources, secure=secure)
        return url

    def remove_connector(self, handle: str) -> None:
        self.command("remove_connector", handle=handle)

    def start(self) -> None:
        self.command("start")

    def send(
        self,
        to: str,
        app_id: int,
        headers: dict | None = None,
        payload: bytes | None = None,
        *,
        repeat: int = 1,
        timeout: float | None = None,
    ) -> None:
        """``Communicator.send`` from the peer; ``payload`` None is sent as None.
        A bytearray payload is handed to nvflare as a bytearray."""
        fields: dict = {
            "to": to,
            "app_id": int(app_id),
            "headers": to_json(headers),
            "payload_b64": None if payload is None else base64.b64encode(bytes(payload)).decode("ascii"),
            "repeat": int(repeat),
        }
        if isinstance(payload, bytearray):
            fields["payload_type"] = "bytearray"
        self.command("send", timeout=timeout, **fields)

    def find_endpoint(self, name: str) -> dict | None:
        """``{"name", "state", "properties", "conn_props"}`` (decoded) or None."""
        ep = self.command("find_endpoint", name=name)["endpoint"]
        if ep is not None:
            ep["properties"] = from_json(ep["properties"])
            ep["conn_props"] = from_json(ep["conn_props"])
        return ep

    def remove_endpoint(self, name: str) -> None:
        self.command("remove_endpoint", name=name)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the communicator and let the process exit (raises if that fails)."""
        if self._closed or self.proc is None or self.proc.poll() is not None:
            return
        self.command("stop", timeout=timeout)
        try:
            self.proc.wait(scaled(timeout))
        except subprocess.TimeoutExpired:
            raise self._error("did not exit after stop") from None

    def close(self) -> None:
        """Stop (best effort), kill if needed, join the reader, close pipes, delete stderr file."""
        if self._closed:
            return
        proc = self.proc
        try:
            if proc is not None and proc.poll() is None:
                try:
                    self.stop(timeout=5.0)
                except Exception:
                    pass
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                try:
                    proc.wait(scaled(10))
                except subprocess.TimeoutExpired:
                    pass
            self._closed = True
            if proc is not None and proc.stdin is not None:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
            if self._reader is not None:
                self._reader.join(scaled(10))
            if proc is not None and proc.stdout is not None:
                proc.stdout.close()
        finally:
            self._closed = True
            try:
                self._stderr_file.close()
            finally:
                try:
                    os.unlink(self._stderr_path)
                except OSError:
                    pass
