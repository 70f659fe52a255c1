"""TLS test material for the interop tests: a throwaway PKI on disk, and a TCP relay that
shows what happened to a connection nobody admits.

* ``Pki(directory)``: a trustme CA (and a second, unrelated one); ``server(cn)`` and
  ``client(cn, ...)`` write PEM files and return the TLS params for them under NVFlare's
  names (``ca_cert``, ``server_cert``, ``server_key``, ``client_cert``, ``client_key``,
  ``connection_security``), which sfm connectors take as they are. Server certificates carry
  the SANs ``127.0.0.1`` and ``localhost`` (gRPC clients check them) and CN = the server's
  endpoint name; client certificates CN = the client's endpoint name (NVFlare's identity rule).
* ``Relay(target_port)``: listens on a free loopback port and copies bytes both ways to
  ``127.0.0.1:target_port``, recording for each connection how many bytes went each way and
  which side ended it first. A refused TLS handshake and a peer closed after its HELLO both
  show up as a connection the listener's side ended first; no driver log text is needed.

Only the test side imports this (trustme is in sfm's venv); the NVFlare peer only reads the
PEM files.
"""

from __future__ import annotations

import datetime
import os
import selectors
import socket
import threading
from dataclasses import dataclass, field

import trustme

#: Who ended a relayed connection first.
CLIENT = "client"
SERVER = "server"


class Pki:
    """PEM files of a test CA and the certificates issued from it, in ``directory``."""

    def __init__(self, directory: os.PathLike | str) -> None:
        self.dir = os.fspath(directory)
        self.ca = trustme.CA(organization_name="sfm interop CA")
        #: A CA nobody trusts: certificates from it must be refused.
        self.other_ca = trustme.CA(organization_name="another CA")
        self.ca_cert = self._write("ca.pem", self.ca.cert_pem.bytes())
        self.other_ca_cert = self._write("other-ca.pem", self.other_ca.cert_pem.bytes())
        self._n = 0

    def _write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def _issue(self, tag: str, cn: str, *, sans: tuple[str, ...], ca: trustme.CA, expired: bool) -> tuple[str, str]:
        kwargs = {}
        if expired:
            now = datetime.datetime.now(datetime.UTC)
            kwargs = {"not_before": now - datetime.timedelta(days=30), "not_after": now - datetime.timedelta(days=1)}
        leaf = ca.issue_cert(*sans, common_name=cn, **kwargs)
        self._n += 1
        stem = f"{self._n:02d}-{tag}-{cn}"
        cert = self._write(f"{stem}.crt", b"".join(p.bytes() for p in leaf.cert_chain_pems))
        key = self._write(f"{stem}.key", leaf.private_key_pem.bytes())
        return cert, key

    def server(self, cn: str = "server", *, security: str = "mtls", other_ca: bool = False) -> dict:
        """Listener params: a certificate for ``cn`` with SANs 127.0.0.1 and localhost."""
        cert, key = self._issue(
            "server", cn, sans=("127.0.0.1", "localhost"), ca=self.other_ca if other_ca else self.ca, expired=False
        )
        return {"ca_cert": self.ca_cert, "server_cert": cert, "server_key": key, "connection_security": security}

    def client(
        self, cn: str, *, security: str = "mtls", other_ca: bool = False, expired: bool = False, cert: bool = True
    ) -> dict:
        """Connector params: a client certificate for ``cn`` (from the other CA, or expired),
        or none at all (``cert=False``, as a ``tls`` connector has)."""
        params = {"ca_cert": self.ca_cert, "connection_security": security}
        if cert:
            ca = self.other_ca if other_ca else self.ca
            sans = (f"{cn}.clients.invalid",)
            params["client_cert"], params["client_key"] = self._issue("client", cn, sans=sans, ca=ca, expired=expired)
        return params


@dataclass
class RelayedConnection:
    """One connection through a :class:`Relay`."""

    to_server: int = 0  # bytes the client sent
    to_client: int = 0  # bytes the server sent
    first_end: str | None = None  # CLIENT or SERVER: who closed (or reset) first
    error: str | None = None  # a reset or a failed connect to the target
    done: threading.Event = field(default_factory=threading.Event)


class Relay:
    """A loopback TCP relay to ``127.0.0.1:target_port``; see the module docstring.

    One thread, joined by ``close()``, which also closes every socket."""

    def __init__(self, target_port: int, name: str = "relay") -> None:
        self.target = ("127.0.0.1", target_port)
        self.connections: list[RelayedConnection] = []
        self._lock = threading.Lock()
        self._sel = selectors.DefaultSelector()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._pairs: dict[socket.socket, tuple[socket.socket, RelayedConnection, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"interop-{name}-{self.port}", daemon=True)
        self._thread.start()

    def url(self, scheme: str) -> str:
        return f"{scheme}://127.0.0.1:{self.port}"

    def ended(self) -> list[RelayedConnection]:
        """The connections one side has ended (closed, reset, or the target refused): the other
        side may keep its socket open a while (NVFlare's tcp client does, FINDINGS.md)."""
        with self._lock:
            return [c for c in self.connections if c.first_end is not None]

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(0.05):
                if key.data is None:
                    self._accept()
                elif key.fileobj in self._pairs:  # not finished by its peer's event of this batch
                    self._pump(key.fileobj)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        rc = RelayedConnection()
        with self._lock:
            self.connections.append(rc)
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            server.settimeout(5.0)
            server.connect(self.target)
        except OSError as e:
            rc.error = f"connect to {self.target}: {e}"
            rc.first_end = SERVER
            server.close()
            client.close()
            rc.done.set()
            return
        for s in (client, server):
            s.setblocking(True)
            s.settimeout(5.0)  # sends are small: a stuck sendall would only mean a broken test
        self._pairs[client] = (server, rc, CLIENT)
        self._pairs[server] = (client, rc, SERVER)
        self._sel.register(client, selectors.EVENT_READ, CLIENT)
        self._sel.register(server, selectors.EVENT_READ, SERVER)

    def _pump(self, sock: socket.socket) -> None:
        other, rc, side = self._pairs[sock]
        try:
            data = sock.recv(65536)
        except OSError as e:
            rc.error = rc.error or f"{side}: {e}"
            data = b""
        if data:
            try:
                other.sendall(data)
            except OSError as e:  # the other side is gone (reset)
                other_side = SERVER if side == CLIENT else CLIENT
                rc.error = rc.error or f"to {other_side}: {e}"
                if rc.first_end is None:
                    rc.first_end = other_side
                self._finish(sock)
                return
            if side == CLIENT:
                rc.to_server += len(data)
            else:
                rc.to_client += len(data)
            return
        # this side ended: pass the half-close on; the pair is over when both have ended
        if rc.first_end is None:
            rc.first_end = side
        self._sel.unregister(sock)
        try:
            other.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if not self._registered(other):
            self._finish(sock)

    def _registered(self, sock: socket.socket) -> bool:
        try:
            self._sel.get_key(sock)
            return True
        except (KeyError, ValueError):
            return False

    def _finish(self, sock: socket.socket) -> None:
        other, rc, _ = self._pairs.pop(sock)
        self._pairs.pop(other, None)
        for s in (sock, other):
            if self._registered(s):
                self._sel.unregister(s)
            s.close()
        rc.done.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in list(self._pairs):
            if sock in self._pairs:
                self._finish(sock)
        self._sel.unregister(self._listener)
        self._listener.close()
        self._sel.close()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
