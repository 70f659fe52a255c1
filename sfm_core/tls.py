"""One TLS configuration for every driver: parameters as NVFlare names them, checked up front.

A driver calls :meth:`TlsSettings.from_params` with its connector's params (they may come
from the URL query too) and builds its transport's TLS from the result: an
:class:`ssl.SSLContext` (:meth:`TlsSettings.server_context`, :meth:`TlsSettings.client_context`)
or the PEM bytes (:meth:`TlsSettings.pem`) for libraries that take those (gRPC). No driver
builds TLS from raw params itself. See ``docs/security.md``.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Mapping
from typing import Any

from .errors import CommError
from .params import get_param

#: Secure schemes and the plain scheme each secures.
SECURE_SCHEMES = {"stcp": "tcp", "grpcs": "grpc", "wss": "ws", "https": "http"}

MTLS = "mtls"
TLS = "tls"
CLEAR = "clear"
SECURITY_MODES = (MTLS, TLS, CLEAR)

#: Connection properties a TLS connection reports (``Connection.get_conn_properties``).
PEER_CN = "peer_cn"  # the subject common name of the peer's certificate, or None
TLS_VERSION = "tls_version"
TLS_CIPHER = "tls_cipher"
#: True when the peer's claimed endpoint name must resolve to ``peer_cn`` (mutual TLS).
IDENTITY_BINDING = "identity_binding"

PARAMS = ("ca_cert", "server_cert", "server_key", "client_cert", "client_key", "connection_security", "secure")
DEFAULT_HANDSHAKE_TIMEOUT = 10.0


class TlsSettings:
    """The TLS side of one connector: which files, which mode, and the contexts built from them.

    ``security``: ``mtls`` (both sides present certificates; identity binding on), ``tls``
    (only the server does), or ``clear`` on a secure scheme, which, as in NVFlare, still runs
    mutual TLS but turns identity binding off.
    """

    def __init__(self, params: Mapping[str, Any], *, server: bool, scheme: str, driver: str) -> None:
        self.server = server
        self.scheme = scheme
        self.driver = driver
        security = str(params.get("connection_security") or MTLS).lower()
        if security not in SECURITY_MODES:
            raise CommError(
                CommError.BAD_CONFIG,
                f"{driver}: connection_security={params.get('connection_security')!r} is not one of "
                f"{', '.join(SECURITY_MODES)}",
            )
        self.security = security
        self.check_hostname = get_param(params, "check_hostname", bool, False, driver=driver)
        self.handshake_timeout = get_param(
            params, "tls_handshake_timeout", float, DEFAULT_HANDSHAKE_TIMEOUT, driver=driver, minimum=0.001
        )
        mutual = security in (MTLS, CLEAR)
        if server:
            needed = ["ca_cert", "server_cert", "server_key"] if mutual else ["server_cert", "server_key"]
        else:
            needed = ["ca_cert", "client_cert", "client_key"] if mutual else ["ca_cert"]
        missing = [k for k in needed if not params.get(k)]
        if missing:
            raise CommError(
                CommError.BAD_CONFIG,
                f"{driver}: {scheme}:// {'listener' if server else 'connector'} with connection_security={security} "
                f"needs {', '.join(needed)}; missing: {', '.join(missing)}",
            )
        self.files = {
            k: str(params[k])
            for k in ("ca_cert", "server_cert", "server_key", "client_cert", "client_key")
            if params.get(k)
        }
        self._lock = threading.Lock()
        self._context = self._build()

    @classmethod
    def from_params(cls, params: Mapping[str, Any], *, server: bool, driver: str) -> TlsSettings | None:
        """The TLS settings a connector's params ask for, or None for a plain connection.

        TLS is on for a secure scheme (``stcp``, ``grpcs``, ``wss``, ``https``) or with
        ``secure=true``. Raises ``CommError(BAD_CONFIG)`` naming the parameter and the file
        when something is missing, unreadable or does not fit.
        """
        scheme = str(params.get("scheme", ""))
        secure = scheme in SECURE_SCHEMES or get_param(params, "secure", bool, False, driver=driver)
        if not secure:
            return None
        return cls(params, server=server, scheme=scheme, driver=driver)

    @property
    def mutual(self) -> bool:
        """Both sides present a certificate."""
        return self.security in (MTLS, CLEAR)

    @property
    def binds_identity(self) -> bool:
        """A peer's claimed endpoint name must resolve to its certificate's CN."""
        return self.security == MTLS

    # -- contexts ------------------------------------------------------------------------

    def context(self) -> ssl.SSLContext:
        """The current context for new connections (server or client, as constructed)."""
        with self._lock:
            return self._context

    def server_context(self) -> ssl.SSLContext:
        """The context a listener wraps accepted connections with."""
        if not self.server:
            raise CommError(CommError.ERROR, "server_context() of a client's TLS settings")
        return self.context()

    def client_context(self) -> ssl.SSLContext:
        """The context a connector wraps its connection with."""
        if self.server:
            raise CommError(CommError.ERROR, "client_context() of a listener's TLS settings")
        return self.context()

    def reload(self) -> None:
        """Read the files again: new connections use them, live ones go on. On error the old
        settings stay and ``CommError(BAD_CONFIG)`` says what is wrong."""
        context = self._build()
        with self._lock:
            self._context = context

    def pem(self, name: str) -> bytes | None:
        """The bytes of one of the files (``ca_cert``, ``server_key``, ...), or None if not set."""
        path = self.files.get(name)
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise CommError(
                CommError.BAD_CONFIG, f"{self.driver}: {name}={path!r} cannot be read: {e.strerror}"
            ) from None

    def _build(self) -> ssl.SSLContext:
        for name in self.files:
            self.pem(name)  # unreadable files are reported by name before ssl's own words
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if self.server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # A TLS 1.2 renegotiation would run inside a read of a driver's I/O thread: refused.
        ctx.options |= ssl.OP_NO_RENEGOTIATION
        cert, key = ("server_cert", "server_key") if self.server else ("client_cert", "client_key")
        if cert in self.files:
            try:
                ctx.load_cert_chain(self.files[cert], self.files[key])
            except ssl.SSLError as e:
                raise CommError(
                    CommError.BAD_CONFIG,
                    f"{self.driver}: {cert}={self.files[cert]!r} and {key}={self.files[key]!r} do not make a "
                    f"certificate and its key: {e.reason or e}",
                ) from None
        if "ca_cert" in self.files:
            try:
                ctx.load_verify_locations(cafile=self.files["ca_cert"])
            except ssl.SSLError as e:
                raise CommError(
                    CommError.BAD_CONFIG,
                    f"{self.driver}: ca_cert={self.files['ca_cert']!r} is not a PEM CA certificate: {e.reason or e}",
                ) from None
        if self.server:
            ctx.verify_mode = ssl.CERT_REQUIRED if self.mutual else ssl.CERT_NONE
        else:
            ctx.check_hostname = self.check_hostname
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def peer_properties(ssl_object: ssl.SSLObject | ssl.SSLSocket, settings: TlsSettings) -> dict[str, Any]:
    """The connection properties of a TLS connection: the peer's CN, version, cipher, and
    whether its claimed name is bound to the CN."""
    cert = ssl_object.getpeercert() or {}
    cipher = ssl_object.cipher()
    return {
        PEER_CN: common_name(cert),
        TLS_VERSION: ssl_object.version(),
        TLS_CIPHER: cipher[0] if cipher else None,
        IDENTITY_BINDING: settings.binds_identity,
    }


def common_name(cert: Mapping[str, Any]) -> str | None:
    """The subject commonName of a certificate as ``getpeercert()`` returns it, or None."""
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
