"""Sans-I/O handshake parsing, endpoint names, extension negotiation and URL parsing."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sfm_core import CommError
from sfm_core.handshake import build_handshake, negotiate, parse_handshake, validate_endpoint_name
from sfm_core.url import parse_url


@pytest.mark.parametrize("name", ["server", "site-1", "site-1.job_7", "A.b.C", "x~y"])
def test_valid_names(name: str) -> None:
    assert validate_endpoint_name(name) == name


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "non-empty"),
        ("a..b", "dot-separated part"),
        ("a b", "dot-separated part"),
        ("x.y.x", "repeated"),
        (3, "non-empty string"),
    ],
)
def test_invalid_names(name: object, why: str) -> None:
    with pytest.raises(CommError, match=why) as err:
        validate_endpoint_name(name)
    assert err.value.code == CommError.BAD_CONFIG


def test_handshake_map_is_the_original_plus_extensions_only_when_offered() -> None:
    plain = msgpack.unpackb(build_handshake("site-1", {"role": "x"}))
    assert set(plain) == {"endpoint_name", "timestamp", "role"}
    assert isinstance(plain["timestamp"], float)
    ext = msgpack.unpackb(build_handshake("site-1", None, ["b", "a"]))
    assert ext["sfm_ext"] == ["a", "b"]


def test_parse_handshake() -> None:
    hello = parse_handshake(build_handshake("site-1", {"k": 1}, ["batch"]), "server")
    assert hello.name == "site-1"
    assert hello.properties["k"] == 1
    assert hello.extensions == {"batch"}
    assert negotiate(["batch", "other"], hello.extensions) == {"batch"}
    assert negotiate([], hello.extensions) == frozenset()


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (None, "no payload"),
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb([1]), "must be a map"),
        (msgpack.packb({"timestamp": 1.0}), "no endpoint_name"),
        (msgpack.packb({"endpoint_name": ""}), "no endpoint_name"),
        (msgpack.packb({"endpoint_name": "server"}), "our own endpoint name"),
    ],
)
def test_bad_handshakes_are_refused(payload: bytes | None, why: str) -> None:
    with pytest.raises(CommError, match=why) as err:
        parse_handshake(payload, "server")
    assert err.value.code == CommError.BAD_DATA


@given(st.binary(max_size=100))
def test_parse_handshake_of_random_bytes_raises_only_commerror(data: bytes) -> None:
    try:
        parse_handshake(data, "server")
    except CommError as e:
        assert e.code == CommError.BAD_DATA


def test_parse_url() -> None:
    p = parse_url("tcp://0:8002?a=1&b=two")
    assert p == {"scheme": "tcp", "host": "0", "port": 8002, "a": "1", "b": "two", "url": "tcp://0:8002?a=1&b=two"}
    assert parse_url("ws://host:1/f3")["path"] == "/f3"
    assert parse_url("grpc://[::1]:5")["host"] == "::1"


@pytest.mark.parametrize("url", ["nothing", "tcp:/x", "tcp://host:notaport", "://x:1"])
def test_bad_urls_name_the_problem(url: str) -> None:
    with pytest.raises(CommError) as err:
        parse_url(url)
    assert err.value.code == CommError.BAD_CONFIG
    assert url in str(err.value) or "scheme" in str(err.value)
