"""TLS for the WebSocket driver (``wss://``, ``https://``, or ``secure=true``).

The listener accepts sockets itself, on the shared loop, instead of ``create_server(ssl=...)``:
that way each handshake uses the context :class:`sfm_core.tls.TlsSettings` holds *now* (so
``reload_tls`` applies to the next connection), and the first byte of every connection is
looked at (``MSG_PEEK``, nothing consumed) before TLS starts, so a plaintext client is told
what it did wrong (an HTTP 400 saying the listener speaks TLS, a WARNING here) instead of
failing in silence. The handshake itself is asyncio's (``connect_accepted_socket``), on the
loop without blocking it, bounded by ``tls_handshake_timeout`` from the moment of accept.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable

from sfm_core.limits import Slot
from sfm_core.tls import SECURE_SCHEMES, TlsSettings
from sfm_core.url import host_port

log = logging.getLogger(__name__)

#: The record type of a TLS handshake record: the first byte of every TLS ClientHello.
TLS_HANDSHAKE_RECORD = 0x16
_PLAIN_TO_SECURE = {plain: secure for secure, plain in SECURE_SCHEMES.items()}
#: Connections accepted per wake-up of the listening socket (then the loop serves others).
_ACCEPT_BATCH = 128
#: OpenSSL reasons that mean the other side does not speak TLS at all.
_NOT_TLS_REASONS = {
    "WRONG_VERSION_NUMBER",
    "UNKNOWN_PROTOCOL",
    "RECORD_LAYER_FAILURE",
    "PACKET_LENGTH_TOO_LONG",
    "HTTP_REQUEST",
}


def secure_scheme(scheme: str) -> str:
    """The secure form of a scheme (``ws`` -> ``wss``, ``http`` -> ``https``); secure ones as they are."""
    return _PLAIN_TO_SECURE.get(scheme, scheme)


def plain_scheme(scheme: str) -> str:
    """The plaintext form of a scheme (``wss`` -> ``ws``, ``https`` -> ``http``)."""
    return SECURE_SCHEMES.get(scheme, scheme)


def plaintext_response(scheme: str) -> bytes:
    """What a TLS listener answers to a plaintext HTTP client (the client shows the body)."""
    body = (
        f"this listener speaks TLS ({secure_scheme(scheme)}://): the client connected with plaintext "
        f"({plain_scheme(scheme)}://)\n"
    ).encode()
    head = (
        "HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


def describe_tls_error(exc: BaseException, scheme: str) -> str:
    """A TLS failure on the client side in words, with what it most likely means."""
    plain = plain_scheme(scheme)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the listener's certificate does not verify: {exc.verify_message or exc}"
    if isinstance(exc, ssl.SSLEOFError | ConnectionResetError | BrokenPipeError):
        # asyncio closes a refused handshake without sending the TLS alert, so the reason is
        # only in the listener's log.
        detail = f" ({exc})" if str(exc) else ""
        return (
            f"the listener closed the connection during the TLS handshake{detail}: did it refuse our client "
            "certificate (its log says why), or is it not TLS?"
        )
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in _NOT_TLS_REASONS:
            return f"{exc} (the listener does not speak TLS: is it a plaintext {plain}:// listener?)"
        if "ALERT" in reason:
            return f"{exc} (the listener refused the TLS connection: our client certificate?)"
        return str(exc)
    return str(exc) or type(exc).__name__


class TlsServer:
    """A TLS listener on the shared loop (loop thread only, except :attr:`sockets`).

    ``factory`` makes the protocol of one connection; it sees the connection only once the
    TLS handshake is done. Quacks like enough of ``asyncio.Server`` for the driver:
    ``sockets`` and ``close()``, plus :meth:`aclose` to wait for handshakes in progress.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        settings: TlsSettings,
        factory: Callable[[], asyncio.Protocol],
        scheme: str,
        shutdown_timeout: float,
        admit: Callable[[str], Slot | None] | None = None,
    ) -> None:
        self.loop = loop
        #: Takes a listener slot for an accepted socket (None when the listener is full).
        self.admit = admit
        #: The slots of sockets whose TLS handshake is not done (then their protocol owns it).
        self._slots: dict[socket.socket, Slot] = {}
        self.settings = settings
        self.factory = factory
        self.scheme = secure_scheme(scheme)
        self.shutdown_timeout = shutdown_timeout
        self.sockets: list[socket.socket] = []
        #: Accepted sockets whose first byte has not come yet, with their timers.
        self._waiting: dict[socket.socket, asyncio.TimerHandle] = {}
        self._handshakes: set[asyncio.Task] = set()
        #: Sockets whose handshake task has not started yet (cancelled then, it would not close them).
        self._unstarted: dict[asyncio.Task, socket.socket] = {}
        self._closed = False

    # -- listening -------------------------------------------------------------------------

    async def start(self, host: str | None, port: int, backlog: int) -> None:
        """Bind and listen on every address of ``host`` (all interfaces for None), as
        ``create_server`` does; raises ``OSError``."""
        infos = await self.loop.getaddrinfo(
            host or None, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        seen = set()
        try:
            for family, type_, proto, _, addr in infos:
                if (family, addr) in seen:
                    continue
                seen.add((family, addr))
                try:
                    sock = socket.socket(family, type_, proto)
                except OSError as e:  # as create_server: skip a family this host cannot open (no IPv6)
                    log.debug("%s listener: no %s socket: %s", self.scheme, family, e)
                    continue
                self.sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if port == 0 and len(self.sockets) > 1:  # one port for every family
                    addr = (addr[0], self.sockets[0].getsockname()[1], *addr[2:])
                sock.bind(addr)
                sock.listen(backlog)
                sock.setblocking(False)
            if not self.sockets:
                raise OSError(f"no socket could be opened for {host_port(host or '*', port)}")
        except OSError:
            for sock in self.sockets:
                sock.close()
            self.sockets = []
            raise
        for sock in self.sockets:
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, lsock: socket.socket) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # As asyncio does: stop accepting for a moment rather than spin.
                    log.warning("%s listener: accept failed: %s; not accepting for 1 s", self.scheme, e)
                    self.loop.remove_reader(lsock.fileno())
                    self.loop.call_later(1.0, self._resume_accepting, lsock)
                    return
                continue  # the client went away between its connect and our accept
            if self.admit is not None:
                slot = self.admit(host_port(addr))
                if slot is None:
                    sock.close()  # the listener is full; the limit logs why
                    continue
                self._slots[sock] = slot
            sock.setblocking(False)
            self._wait_first_byte(sock, addr)

    def _resume_accepting(self, lsock: socket.socket) -> None:
        if not self._closed and lsock.fileno() >= 0:
            self.loop.add_reader(lsock.fileno(), self._accept, lsock)

    def _drop(self, sock: socket.socket) -> None:
        """Close a socket before its protocol exists, and free its slot."""
        sock.close()
        slot = self._slots.pop(sock, None)
        if slot is not None:
            slot.release()

    def _protocol(self, sock: socket.socket) -> asyncio.Protocol:
        # The slot stays in _slots too until the handshake is done: a failed one releases it.
        protocol = self.factory()
        protocol.slot = self._slots.get(sock)  # type: ignore[attr-defined]
        return protocol

    # -- before the handshake: the first byte ----------------------------------------------

    def _wait_first_byte(self, sock: socket.socket, addr: object) -> None:
        timeout = self.settings.handshake_timeout
        deadline = self.loop.time() + timeout
        self._waiting[sock] = self.loop.call_later(timeout, self._silent, sock, addr)
        self.loop.add_reader(sock.fileno(), self._first_byte, sock, addr, deadline)

    def _stop_waiting(self, sock: socket.socket) -> None:
        timer = self._waiting.pop(sock, None)
        if timer is not None:
            timer.cancel()
        if sock.fileno() >= 0:
            self.loop.remove_reader(sock.fileno())

    def _silent(self, sock: socket.socket, addr: object) -> None:
        self._stop_waiting(sock)
        log.warning(
            "%s listener: %s sent nothing within tls_handshake_timeout %s s; closing",
            self.scheme,
            host_port(addr),
            self.settings.handshake_timeout,
        )
        self._drop(sock)

    def _first_byte(self, sock: socket.socket, addr: object, deadline: float) -> None:
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._stop_waiting(sock)
            log.info("%s listener: %s gone before the TLS handshake: %s", self.scheme, host_port(addr), e)
            self._drop(sock)
            return
        self._stop_waiting(sock)
        if not first:
            log.info("%s listener: %s closed the connection before the TLS handshake", self.scheme, host_port(addr))
            self._drop(sock)
            return
        if first[0] != TLS_HANDSHAKE_RECORD:
            self._plaintext(sock, addr)
            return
        task = self.loop.create_task(self._handshake(sock, addr, deadline))
        self._handshakes.add(task)
        self._unstarted[task] = sock
        task.add_done_callback(self._handshake_done)

    def _handshake_done(self, task: asyncio.Task) -> None:
        self._handshakes.discard(task)
        sock = self._unstarted.pop(task, None)
        if sock is not None:  # cancelled before it ran: the socket is still ours
            self._drop(sock)

    def _plaintext(self, sock: socket.socket, addr: object) -> None:
        log.warning(
            "%s listener: plaintext request (not a TLS ClientHello) from %s on a TLS %s:// listener: the client uses "
            "%s://?; answering 400 and closing",
            self.scheme,
            host_port(addr),
            self.scheme,
            plain_scheme(self.scheme),
        )
        try:
            sock.recv(65536)  # what came, so that the close is a FIN and the answer is read
            sock.send(plaintext_response(self.scheme))
        except OSError:
            pass
        self._drop(sock)

    # -- the handshake ---------------------------------------------------------------------

    async def _handshake(self, sock: socket.socket, addr: object, deadline: float) -> None:
        self._unstarted.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
        try:
            await self.loop.connect_accepted_socket(
                lambda: self._protocol(sock),
                sock,
                ssl=self.settings.server_context(),
                ssl_handshake_timeout=max(deadline - self.loop.time(), 0.001),
                ssl_shutdown_timeout=self.shutdown_timeout,
            )
            self._slots.pop(sock, None)  # the protocol owns it now
        except asyncio.CancelledError:
            self._drop(sock)  # the listener is closing; asyncio closed the transport, the slot is ours
            raise
        except OSError as e:  # ssl.SSLError, the handshake timeout, a reset
            log.warning(
                "%s listener: TLS handshake with %s failed: %s", self.scheme, host_port(addr), _server_reason(e)
            )
            # asyncio force-closed the transport (no reader or writer left on the socket); this
            # also closes a socket it failed to make a transport of.
            self._drop(sock)
        except Exception as e:  # nothing from the loop escapes as a traceback
            log.warning("%s listener: TLS handshake with %s failed: %r", self.scheme, host_port(addr), e)
            self._drop(sock)

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting, drop the sockets still before their handshake, cancel the handshakes."""
        self._closed = True
        for sock in self.sockets:
            if sock.fileno() >= 0:
                self.loop.remove_reader(sock.fileno())
            sock.close()
        for sock in list(self._waiting):
            self._stop_waiting(sock)
            self._drop(sock)
        for task in list(self._handshakes):
            task.cancel()

    async def aclose(self) -> None:
        """:meth:`close`, then wait until the cancelled handshakes are done."""
        self.close()
        tasks = list(self._handshakes)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)  # the transports' connection_lost (which closes their sockets)
        await asyncio.sleep(0)


def _server_reason(e: OSError) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"client certificate refused: {e.verify_message or e}"
    if isinstance(e, ssl.SSLError) and e.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return f"the client sent no certificate, and this listener needs one (mutual TLS): {e}"
    if isinstance(e, ssl.SSLEOFError | ConnectionResetError | BrokenPipeError):
        return (
            f"the client closed the connection during the handshake ({e or type(e).__name__}): "
            "did it refuse our certificate?"
        )
    return str(e) or type(e).__name__
