"""This driver's own checks, beside the conformance suite (which conftest.py turns on)."""

import os
import socket
import stat
import tempfile

import pytest
from sfm_core import CommError, ConnManager, Endpoint, Mode, get_registry

from sfm_driver_uds.driver import SCHEME, UdsDriver


@pytest.fixture
def tmp():
    with tempfile.TemporaryDirectory(prefix="sfmt-") as directory:  # short: socket paths are limited
        yield directory


def listen(url: str, **params) -> tuple[ConnManager, str]:
    manager = ConnManager(Endpoint("server"))
    handle = manager.add_connector(url, params, Mode.PASSIVE)
    manager.start()
    try:
        return manager, manager.wait_listening(handle, 10)
    except CommError:
        manager.stop()
        raise


def test_the_scheme_is_served_by_this_driver():
    assert isinstance(get_registry().create_driver(SCHEME), UdsDriver)


@pytest.mark.parametrize("url", [f"{SCHEME}://0:0", f"{SCHEME}://tmp/x.sock", f"{SCHEME}://"])
def test_a_url_without_a_socket_path_is_refused(url):
    with pytest.raises(CommError) as e:
        ConnManager(Endpoint("server")).add_connector(url, {}, Mode.PASSIVE)
    assert e.value.code == CommError.BAD_CONFIG
    assert "three slashes" in str(e.value)


def test_a_path_too_long_is_refused():
    with pytest.raises(CommError, match="longer than"):
        ConnManager(Endpoint("server")).add_connector(f"{SCHEME}:///{'x' * 200}", {}, Mode.PASSIVE)


def test_listening_reports_the_path_and_removes_the_file_at_stop(tmp):
    path = os.path.join(tmp, "my app.sock")
    manager, url = listen(f"{SCHEME}://{path.replace(' ', '%20')}", socket_mode="600")
    try:
        assert url == f"{SCHEME}://{path.replace(' ', '%20')}"
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        manager.stop()
    assert not os.path.exists(path)


def test_a_stale_socket_file_is_replaced_and_one_in_use_refused(tmp):
    path = os.path.join(tmp, "sfm.sock")
    crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    crashed.bind(path)  # a listener that died without removing its file
    crashed.close()
    manager, _url = listen(f"{SCHEME}://{path}")
    try:
        with pytest.raises(CommError, match="in use"):
            listen(f"{SCHEME}://{path}")
        assert stat.S_ISSOCK(os.stat(path).st_mode), "the second listener removed the first one's file"
    finally:
        manager.stop()


def test_a_file_that_is_not_a_socket_is_left_alone(tmp):
    path = os.path.join(tmp, "precious.txt")
    with open(path, "w") as f:
        f.write("keep me")
    with pytest.raises(CommError, match="cannot listen"):
        listen(f"{SCHEME}://{path}")
    with open(path) as f:
        assert f.read() == "keep me"


def test_a_bad_socket_mode_is_refused():
    with pytest.raises(CommError, match="socket_mode"):
        ConnManager(Endpoint("server")).add_connector(f"{SCHEME}:///tmp/x.sock?socket_mode=999", {}, Mode.PASSIVE)
