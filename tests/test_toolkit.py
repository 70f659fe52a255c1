"""The driver toolkit of the core: host bracketing (sfm_core.url.host_port), the bounded send
queue (sfm_core.send_queue), whole-frame checks for message transports (sfm_core.frame_check)
and the asyncio driver base (sfm_core.aio_driver)."""

from __future__ import annotations

import pytest

from sfm_core.url import format_url, host_port

# -- host_port -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("127.0.0.1", 80), "127.0.0.1:80"),
        (("::1", 80), "[::1]:80"),
        (("[::1]", 80), "[::1]:80"),
        (("fe80::1%eth0", 5), "[fe80::1%eth0]:5"),
        (("example.org", 443), "example.org:443"),
        (("::1",), "[::1]"),
        (("localhost",), "localhost"),
        ((("10.0.0.1", 9),), "10.0.0.1:9"),
        ((("::1", 9, 0, 0),), "[::1]:9"),
        ((None,), "None"),
        ((("x",),), "('x',)"),
    ],
)
def test_host_port_brackets_ipv6_hosts_only(args, expected) -> None:
    assert host_port(*args) == expected


def test_format_url_uses_the_same_bracketing() -> None:
    assert format_url("ws", "::1", 8, "/f3") == "ws://[::1]:8/f3"
    assert format_url("tcp", "[::1]", 8) == "tcp://[::1]:8"
    assert format_url("grpc", "h", 1) == "grpc://h:1"
