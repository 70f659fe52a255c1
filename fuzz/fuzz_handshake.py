"""Fuzz the handshake codec (sfm_core/handshake.py): the HELLO/READY map and the PING payload.

Run: ``python fuzz/fuzz_handshake.py [libFuzzer flags] [corpus dirs]`` (see docs/fuzzing.md).

The first input byte picks a mode:

* ``raw``: ``parse_handshake`` on the rest as the payload, and ``decode_ping_payload`` on it.
* ``map``: a handshake map built from fuzzer-chosen keys and values (a name that may be ours,
  invalid or not a string; ``sfm_ext`` and ``sfm_max_frame_size`` of any type), msgpack-packed
  and parsed, so the parser's own checks are reached more often than from raw bytes.
* ``name``: ``validate_endpoint_name`` on a fuzzer-chosen string, against a reference of the rules.

Checked: only ``CommError`` escapes (``BAD_DATA`` from the parsers, ``BAD_CONFIG`` from
``validate_endpoint_name``). An accepted handshake names a valid endpoint that is not ours, has
string extensions only and no limit or an int limit >= 16, and keeps no protocol key among the
properties; ``build_handshake`` of what was parsed parses back to the same peer.
"""

from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fuzzinput import Input, fuzz, instrumented

with instrumented(__name__ == "__main__"):
    import msgpack

    from sfm_core.errors import CommError
    from sfm_core.frames import PREFIX_LEN
    from sfm_core.handshake import (
        ENDPOINT_NAME_KEY,
        EXTENSIONS_KEY,
        FRAME_LIMIT_EXTENSION,
        MAX_FRAME_SIZE_KEY,
        TIMESTAMP_KEY,
        PeerHello,
        build_handshake,
        decode_ping_payload,
        parse_handshake,
        validate_endpoint_name,
    )

LOCAL = "server"
NAMES = ("site-1", LOCAL, "a.b.c", "a.b.a", "", ".", "a..b", "bad name", "x" * 300, "s~_-9", "é", 7, None, b"site-1")
EXTS = (FRAME_LIMIT_EXTENSION, "compression", "", "frame-limit ", 3, None, b"x")
LIMITS = (None, 16, 15, 0, -1, 1 << 20, (1 << 64) - 1, -(1 << 63), True, 16.0, "16", [16])
_VALID_PART = re.compile(r"[A-Za-z0-9_~\-]+")


def name_ok(name) -> bool:
    """The endpoint name rules, written again: non-empty parts of A-Z a-z 0-9 _ ~ -, none repeated."""
    if not isinstance(name, str) or not name:
        return False
    parts = name.split(".")
    return all(_VALID_PART.fullmatch(p) for p in parts) and len(set(parts)) == len(parts)


def check_parse(payload: bytes | None) -> PeerHello | None:
    try:
        peer = parse_handshake(payload, LOCAL)
    except CommError as e:
        assert e.code == CommError.BAD_DATA, e
        return None
    assert isinstance(peer, PeerHello)
    assert name_ok(peer.name) and peer.name != LOCAL, peer.name
    assert isinstance(peer.extensions, frozenset) and all(isinstance(x, str) for x in peer.extensions)
    assert peer.max_frame_size is None or (type(peer.max_frame_size) is int and peer.max_frame_size >= PREFIX_LEN)
    assert isinstance(peer.properties, dict)
    assert not {ENDPOINT_NAME_KEY, EXTENSIONS_KEY, MAX_FRAME_SIZE_KEY} & set(peer.properties)

    # Build it again (as READY would) and parse that: the same peer.
    stamp = peer.properties.get(TIMESTAMP_KEY)
    if type(stamp) not in (int, float):
        stamp = 0.0
    limit = peer.max_frame_size
    rebuilt = build_handshake(peer.name, peer.properties, peer.extensions, stamp, limit)
    again = parse_handshake(rebuilt, LOCAL)
    assert again.name == peer.name and again.extensions == peer.extensions
    expect_limit = limit if FRAME_LIMIT_EXTENSION in peer.extensions else None
    assert again.max_frame_size == expect_limit, (again.max_frame_size, expect_limit)
    props = {k: v for k, v in peer.properties.items() if k != TIMESTAMP_KEY}
    again_props = {k: v for k, v in again.properties.items() if k != TIMESTAMP_KEY}
    assert msgpack.packb(again_props) == msgpack.packb(props)
    assert msgpack.packb(again.properties[TIMESTAMP_KEY]) == msgpack.packb(stamp)
    return peer


def check_ping(payload: bytes | None) -> None:
    try:
        decode_ping_payload(payload)
    except CommError as e:
        assert e.code == CommError.BAD_DATA, e
        return
    if payload is not None:
        value = msgpack.unpackb(payload)
        assert value is None or isinstance(value, dict)


def _value(inp: Input):
    kind = inp.byte() % 8
    if kind == 0:
        return inp.uint(inp.byte() % 9)
    if kind == 1:
        return inp.text()
    if kind == 2:
        return inp.sized(16)
    if kind == 3:
        return [_value(inp) for _ in range(inp.byte() % 3)]
    if kind == 4:
        return {inp.text(8): _value(inp) for _ in range(inp.byte() % 3)}
    if kind == 5:
        return inp.uint(8) / 7.0
    if kind == 6:
        return None
    return -inp.uint(4)


def build_map(inp: Input) -> dict:
    data: dict = {}
    flags = inp.byte()
    if flags & 1:
        data[ENDPOINT_NAME_KEY] = inp.text(40) if flags & 2 else inp.choice(NAMES)
    if flags & 4:
        data[TIMESTAMP_KEY] = _value(inp)
    if flags & 8:
        if flags & 16:
            data[EXTENSIONS_KEY] = [inp.choice(EXTS) for _ in range(inp.byte() % 4)]
        else:
            data[EXTENSIONS_KEY] = _value(inp)
    if flags & 32:
        data[MAX_FRAME_SIZE_KEY] = inp.choice(LIMITS) if flags & 64 else _value(inp)
    for _ in range(inp.byte() % 4):
        data[inp.text(8)] = _value(inp)
    return data


def TestOneInput(data: bytes) -> None:
    inp = Input(data)
    mode = inp.byte() % 3
    if mode == 0:
        payload = inp.rest()
        check_parse(payload or None)
        check_ping(payload or None)
    elif mode == 1:
        packed = msgpack.packb(build_map(inp))
        check_parse(packed)
        check_ping(packed)
    else:
        name = inp.rest().decode("utf-8", "replace")
        try:
            assert validate_endpoint_name(name) == name
            assert name_ok(name), f"accepted {name!r}"
        except CommError as e:
            assert e.code == CommError.BAD_CONFIG, e
            assert not name_ok(name), f"refused {name!r}"


if __name__ == "__main__":
    fuzz(TestOneInput)
