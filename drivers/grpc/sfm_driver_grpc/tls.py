"""TLS for the gRPC driver (``grpcs://``, or ``secure=true`` on ``grpc://``).

gRPC takes PEM bytes, not an :class:`ssl.SSLContext`: :class:`GrpcTls` keeps the bytes of a
connector's files (read through :class:`sfm_core.tls.TlsSettings`, which checks them) and
makes gRPC credentials from them. A listener's credentials are *dynamic*
(``grpc.dynamic_ssl_server_credentials``): gRPC asks a fetcher before every new handshake,
and the fetcher hands over the files read by the last :meth:`GrpcTls.reload`, so a reload
applies to the next connection without restarting the server; live connections go on.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import grpc
from sfm_core.tls import IDENTITY_BINDING, PEER_CN, SECURE_SCHEMES, TLS_CIPHER, TLS_VERSION, TlsSettings

log = logging.getLogger(__name__)

_PEM_NAMES = ("ca_cert", "server_cert", "server_key", "client_cert", "client_key")
_PLAIN_TO_SECURE = {plain: secure for secure, plain in SECURE_SCHEMES.items()}


def secure_scheme(scheme: str) -> str:
    """``grpc`` -> ``grpcs`` (a secure scheme as it is)."""
    return _PLAIN_TO_SECURE.get(scheme, scheme)


class GrpcTls:
    """One connector's TLS for gRPC: the settings and a snapshot of the PEM bytes they name."""

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._pems = self._read()
        self._generation = 0

    def _read(self) -> dict[str, bytes | None]:
        return {name: self.settings.pem(name) for name in _PEM_NAMES}

    def reload(self) -> None:
        """Read the files again (checked by ``TlsSettings.reload``, which raises
        ``CommError(BAD_CONFIG)`` and keeps the old ones if they are wrong)."""
        self.settings.reload()
        pems = self._read()
        with self._lock:
            self._pems = pems
            self._generation += 1

    def _current(self) -> tuple[int, dict[str, bytes | None]]:
        with self._lock:
            return self._generation, self._pems

    # -- listener ----------------------------------------------------------------------

    def server_credentials(self) -> grpc.ServerCredentials:
        """Dynamic server credentials: each new connection's handshake uses the files of the
        last reload. ``require_client_authentication`` follows ``connection_security``."""
        served, pems = self._current()
        state = {"served": served}

        def config(p: dict[str, bytes | None]) -> Any:
            return grpc.ssl_server_certificate_configuration(
                [(p["server_key"], p["server_cert"])], root_certificates=p["ca_cert"]
            )

        def fetch() -> Any:
            # Called by gRPC core before every handshake, on a gRPC thread: cheap, never raises.
            try:
                generation, p = self._current()
                if generation == state["served"]:
                    return None
                state["served"] = generation
                log.info("grpc: listener uses the reloaded TLS files for new connections")
                return config(p)
            except Exception:
                log.exception("grpc: cannot use the reloaded TLS files; the listener keeps the previous ones")
                return None

        return grpc.dynamic_ssl_server_credentials(
            config(pems), fetch, require_client_authentication=self.settings.mutual
        )

    def server_properties(self, context: Any) -> dict[str, Any]:
        """The TLS connection properties of an accepted stream, from its ``auth_context()``:
        the client certificate's CN, the TLS version; gRPC does not tell the cipher."""
        try:
            auth = context.auth_context() or {}
        except Exception:  # not expected on a secure port; report no identity rather than fail
            log.exception("grpc: no auth context for an accepted stream")
            auth = {}

        def first(key: str) -> str | None:
            values = auth.get(key) or ()
            for v in values:
                return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
            return None

        return {
            PEER_CN: first("x509_common_name"),
            TLS_VERSION: first("ssl_tls_version"),
            TLS_CIPHER: None,
            IDENTITY_BINDING: self.settings.binds_identity,
            "ssl_session_reused": first("ssl_session_reused") == "true",
        }

    # -- connector ---------------------------------------------------------------------

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials from the current files: ``ca_cert`` to check the server, and the
        client certificate and key when TLS is mutual."""
        _, p = self._current()
        if self.settings.mutual:
            return grpc.ssl_channel_credentials(
                root_certificates=p["ca_cert"], private_key=p["client_key"], certificate_chain=p["client_cert"]
            )
        return grpc.ssl_channel_credentials(root_certificates=p["ca_cert"])

    @staticmethod
    def client_properties() -> dict[str, Any]:
        """gRPC tells a client nothing of the server's certificate: no CN, so no identity binding
        on this side (as NVFlare's gRPC client); gRPC itself checked the server's SAN."""
        return {PEER_CN: None, TLS_VERSION: None, TLS_CIPHER: None, IDENTITY_BINDING: False}


# -- why a channel did not connect ---------------------------------------------------------

_CLOSED_WORDS = ("Socket closed", "Connection reset", "End of TCP stream", "Broken pipe", "EOF")
_NOT_TLS_WORDS = ("WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG")


def explain_failure(details: str, tls: GrpcTls | None, target: str, override: str | None) -> tuple[str, bool]:
    """What a failed channel's error ``details`` mean here: ``(text, is_a_tls_problem)``.

    gRPC reports the last connect error of a channel in the details of a call made on it
    (``failed to connect to all addresses; last error: ...``); the text puts what to check
    first and gRPC's words after it.
    """
    reason = details.split("last error:", 1)[-1].strip() or "connection failed"
    hint = _hint(details, tls, target, override)
    if hint is None:
        return reason, False
    return f"{hint} (gRPC: {reason})", True


def _hint(details: str, tls: GrpcTls | None, target: str, override: str | None) -> str | None:
    closed = any(w in details for w in _CLOSED_WORDS)
    if tls is None:
        if closed:
            return (
                "the listener closed the connection before HTTP/2 started: if it is a TLS listener (grpcs://), "
                "connect with grpcs:// (this connector speaks plaintext grpc://)"
            )
        return None
    if any(w in details for w in _NOT_TLS_WORDS):
        return "the listener does not speak TLS: it is likely a plaintext grpc:// listener (this connector is grpcs://)"
    if "Hostname Verification" in details:
        host = override or target.rsplit(":", 1)[0].strip("[]")
        return (
            f"the server's certificate does not name {host!r} in its subject alternative names (gRPC checks "
            "them against the dialled host): dial a name it has, or set ssl_target_name_override to one"
        )
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return (
            f"the server's certificate is not trusted by ca_cert={tls.settings.files.get('ca_cert')!r} "
            "(another CA, or expired)"
        )
    if closed or "handshake" in details.lower():
        return (
            "the listener ended the TLS handshake: it may refuse this connector's client certificate (not signed "
            "by its CA, expired, or none sent where it requires mutual TLS), or not speak TLS; the listener's "
            "log says which"
        )
    return None
