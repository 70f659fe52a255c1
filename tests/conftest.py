"""Shared fixtures: every test must leave no thread and no file descriptor behind.

Timeouts follow ``SFM_TESTS_TIMEOUT_FACTOR`` (see ``helpers.scaled``): the leak check's
grace period, pytest-timeout's per-test limit (``timeout`` in pyproject.toml, unless given
on the command line or in ``PYTEST_TIMEOUT``), and Hypothesis, which gets no per-example
deadline (a deadline is a speed assertion).
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from helpers import TIMEOUT_FACTOR, scaled

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass
else:
    settings.register_profile("sfm", deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile("sfm")

# Threads that libraries keep for the life of the process, started on first use; they are
# not leaks of the test that happened to start them.
PROCESS_GLOBAL_THREAD_PREFIXES = ("grpc", "ThreadPoolExecutor", "asyncio_")


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def _threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if not t.name.startswith(PROCESS_GLOBAL_THREAD_PREFIXES)}


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest):
    """Fail a test that leaves threads or open descriptors behind (after a short grace period)."""
    if request.node.get_closest_marker("allow_leaks"):
        yield
        return
    threads_before = _threads()
    fds_before = _open_fds()
    yield
    deadline = time.monotonic() + scaled(5.0)
    while True:
        new_threads = _threads() - threads_before
        new_fds = _open_fds() - fds_before
        if not new_threads and not new_fds:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    details = []
    if new_threads:
        details.append(f"threads left running: {sorted(t.name for t in new_threads)}")
    if new_fds:
        targets = []
        for fd in sorted(new_fds):
            try:
                targets.append(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
            except OSError:
                pass
        if targets:
            details.append(f"file descriptors left open: {targets}")
        else:
            return
    pytest.fail("; ".join(details))


@pytest.hookimpl(tryfirst=True)  # before pytest-timeout reads its settings
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_leaks: this test knowingly leaves process-global resources")
    if TIMEOUT_FACTOR != 1 and config.pluginmanager.hasplugin("timeout"):
        if config.getoption("timeout", None) is None and not os.environ.get("PYTEST_TIMEOUT"):
            ini = config.getini("timeout")
            if ini:
                config.option.timeout = float(ini) * TIMEOUT_FACTOR
