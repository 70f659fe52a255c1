"""Sans-I/O handshake logic: the HELLO/READY map, endpoint name rules, extension negotiation."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable

import msgpack

from .errors import CommError
from .frames import PREFIX_LEN, Buffer

ENDPOINT_NAME_KEY = "endpoint_name"
TIMESTAMP_KEY = "timestamp"
EXTENSIONS_KEY = "sfm_ext"
#: Our extension that announces the largest frame a side accepts (docs/wire-protocol.md).
FRAME_LIMIT_EXTENSION = "frame-limit"
#: The handshake map key under which a side that offers ``frame-limit`` gives its limit.
MAX_FRAME_SIZE_KEY = "sfm_max_frame_size"
#: Our extension by which a listener tells a refused peer why, instead of only closing.
REFUSAL_EXTENSION = "refusal"
#: The key of a refusal READY: the reason, for the refused side's log and error.
REFUSED_KEY = "sfm_refused"

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


def build_handshake(
    name: str,
    properties: dict | None,
    extensions: Iterable[str] = (),
    timestamp: float | None = None,
    max_frame_size: int | None = None,
) -> bytes:
    """The payload of HELLO or READY: name, timestamp, public properties, and our extensions.

    ``sfm_ext`` is only added when there is something to offer, and ``sfm_max_frame_size``
    only with ``frame-limit`` among them, so a plain peer sees the original map.
    ``timestamp`` defaults to now (wall clock, seconds since the epoch).
    """
    # The order NVFlare writes: name, timestamp, then the properties.
    stamp = time.time() if timestamp is None else timestamp
    data: dict = {ENDPOINT_NAME_KEY: name, TIMESTAMP_KEY: stamp}
    if properties:
        data.update(properties)
        data[ENDPOINT_NAME_KEY], data[TIMESTAMP_KEY] = name, stamp  # ours, whatever the properties say
    ext = sorted(set(extensions))
    if ext:
        data[EXTENSIONS_KEY] = ext
        if FRAME_LIMIT_EXTENSION in ext and max_frame_size is not None:
            data[MAX_FRAME_SIZE_KEY] = max_frame_size
    return msgpack.packb(data)


def build_refusal(name: str, reason: str) -> bytes:
    """The payload of a refusal READY (``refusal`` extension): who refuses, and why. Sent
    only to a peer whose HELLO offered the extension; it carries no timestamp, so the
    session that builds it needs no clock."""
    return msgpack.packb({ENDPOINT_NAME_KEY: name, REFUSED_KEY: reason})


def _lenient_map(payload: Buffer | None) -> dict:
    try:
        data = msgpack.unpackb(payload) if payload is not None else None
    except Exception:
        return {}
    return data if isinstance(data, dict) else {}


def offered_extensions(payload: Buffer | None) -> frozenset[str]:
    """The extensions a handshake payload lists, read leniently: a HELLO that is refused
    for another reason (our own name, a bad name) still says whether it may be told why."""
    ext = _lenient_map(payload).get(EXTENSIONS_KEY)
    return frozenset(e for e in ext if isinstance(e, str)) if isinstance(ext, (list, tuple)) else frozenset()


def refusal_reason(payload: Buffer | None) -> str | None:
    """The reason in a refusal READY, or None for a READY that is not one. Read before the
    map is checked as a handshake: a refusal may well be about the very name it carries."""
    reason = _lenient_map(payload).get(REFUSED_KEY)
    if reason is None:
        return None
    return str(reason)[:1000] or "no reason given"  # the peer's words, bounded for our log


class PeerHello:
    """What a peer said about itself in HELLO or READY."""

    __slots__ = ("extensions", "max_frame_size", "name", "properties")

    def __init__(
        self, name: str, properties: dict, extensions: frozenset[str], max_frame_size: int | None = None
    ) -> None:
        self.name = name
        #: The rest of the map: the peer's public properties (our protocol keys removed).
        self.properties = properties
        self.extensions = extensions
        #: The largest frame the peer accepts, if it announced one (``frame-limit``).
        self.max_frame_size = max_frame_size


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
    return peer_from_map(data, local_name)


def peer_from_map(data: dict, local_name: str | None = None) -> PeerHello:
    """The peer described by a decoded handshake map (``data`` is not changed). Raises
    ``CommError(BAD_DATA)`` naming what is wrong: no or a bad ``endpoint_name`` (or
    ``local_name`` itself), a bad ``sfm_max_frame_size``."""
    if not isinstance(data, dict):
        raise CommError(CommError.BAD_DATA, f"handshake map must be a map, got {type(data).__name__}")
    data = dict(data)
    name = data.pop(ENDPOINT_NAME_KEY, None)
    if not isinstance(name, str) or not name:
        raise CommError(CommError.BAD_DATA, "handshake has no endpoint_name")
    if name == local_name:
        raise CommError(CommError.BAD_DATA, f"peer claims our own endpoint name {name!r}")
    try:
        validate_endpoint_name(name)
    except CommError as e:
        raise CommError(CommError.BAD_DATA, f"peer claims {e.message}") from None
    ext = data.pop(EXTENSIONS_KEY, None) or ()
    extensions = frozenset(e for e in ext if isinstance(e, str)) if isinstance(ext, (list, tuple)) else frozenset()
    limit = data.pop(MAX_FRAME_SIZE_KEY, None)
    if limit is not None and (type(limit) is not int or limit < PREFIX_LEN):
        raise CommError(CommError.BAD_DATA, f"handshake {MAX_FRAME_SIZE_KEY} must be an integer >= 16, got {limit!r}")
    return PeerHello(name, data, extensions, limit)


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
