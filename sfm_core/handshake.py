"""Sans-I/O handshake logic: the HELLO/READY map, endpoint name rules, extension negotiation."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable

import msgpack

from .errors import CommError
from .frames import Buffer

ENDPOINT_NAME_KEY = "endpoint_name"
TIMESTAMP_KEY = "timestamp"
EXTENSIONS_KEY = "sfm_ext"

_NAME_PART = re.compile(r"[A-Za-z0-9_~\-]+")


def validate_endpoint_name(name: object) -> str:
    """Return ``name`` if NVFlare would accept it, else raise ``CommError(BAD_CONFIG)``.

    Rules: non-empty; characters ``A-Z a-z 0-9 _ ~ . -``; no empty dot-separated part; no part
    repeated.
    """
    if not isinstance(name, str) or not name:
        raise CommError(CommError.BAD_CONFIG, f"endpoint name must be a non-empty string, got {name!r}")
    parts = name.split(".")
    for part in parts:
        if not _NAME_PART.fullmatch(part):
            raise CommError(
                CommError.BAD_CONFIG,
                f"invalid endpoint name {name!r}: each dot-separated part must be non-empty "
                "and use only A-Z a-z 0-9 _ ~ -",
            )
    if len(set(parts)) != len(parts):
        raise CommError(CommError.BAD_CONFIG, f"invalid endpoint name {name!r}: a dot-separated part is repeated")
    return name


def build_handshake(name: str, properties: dict | None, extensions: Iterable[str] = ()) -> bytes:
    """The payload of HELLO or READY: name, timestamp, public properties, and our extensions.

    ``sfm_ext`` is only added when there is something to offer, so a plain peer sees the
    original map.
    """
    data = dict(properties) if properties else {}
    data[ENDPOINT_NAME_KEY] = name
    data[TIMESTAMP_KEY] = time.time()
    ext = sorted(set(extensions))
    if ext:
        data[EXTENSIONS_KEY] = ext
    return msgpack.packb(data)


class PeerHello:
    """What a peer said about itself in HELLO or READY."""

    __slots__ = ("extensions", "name", "properties")

    def __init__(self, name: str, properties: dict, extensions: frozenset[str]) -> None:
        self.name = name
        self.properties = properties
        self.extensions = extensions


def parse_handshake(payload: Buffer | None, local_name: str) -> PeerHello:
    """Parse a HELLO/READY payload. Raises ``CommError(BAD_DATA)`` naming the problem."""
    if payload is None:
        raise CommError(CommError.BAD_DATA, "handshake has no payload")
    try:
        data = msgpack.unpackb(payload)
    except Exception as e:
        raise CommError(CommError.BAD_DATA, f"handshake payload is not valid msgpack: {e}") from None
    if not isinstance(data, dict):
        raise CommError(CommError.BAD_DATA, f"handshake payload must be a map, got {type(data).__name__}")
    name = data.pop(ENDPOINT_NAME_KEY, None)
    if not isinstance(name, str) or not name:
        raise CommError(CommError.BAD_DATA, "handshake has no endpoint_name")
    if name == local_name:
        raise CommError(CommError.BAD_DATA, f"peer claims our own endpoint name {name!r}")
    ext = data.get(EXTENSIONS_KEY) or ()
    extensions = frozenset(e for e in ext if isinstance(e, str)) if isinstance(ext, (list, tuple)) else frozenset()
    return PeerHello(name, data, extensions)


def negotiate(ours: Iterable[str], theirs: Iterable[str]) -> frozenset[str]:
    """Extensions used on a connection: those both sides listed."""
    return frozenset(ours) & frozenset(theirs)


def decode_ping_payload(payload: Buffer | None) -> None:
    """Check a PING/PONG payload: nil, a map, or nothing. Anything else is ``BAD_DATA``."""
    if payload is None:
        return
    try:
        value = msgpack.unpackb(payload)
    except Exception as e:
        raise CommError(CommError.BAD_DATA, f"heartbeat payload is not valid msgpack: {e}") from None
    if value is not None and not isinstance(value, dict):
        raise CommError(CommError.BAD_DATA, f"heartbeat payload must be nil or a map, got {type(value).__name__}")
