"""A user's type checker sees sfm_core's types: ``mypy --strict`` on a user's script.

The script is written to a temporary directory and checked from there, so mypy finds
``sfm_core`` the way it would for a user, through the environment's site-packages (``py.typed``
and, for the README's editable install, ``editable_mode=compat``; setuptools' default editable
mode hides the package behind an import hook that static checkers do not run). A correct script
must pass, and one with deliberately wrong calls must fail on each of them: were ``sfm_core``
unseen or untyped, its names would be ``Any`` and the wrong calls would pass too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip(
    "mypy", reason="mypy is not installed (it is in the test extra; the README's test command installs it)"
)

GOOD = """
from sfm_core import CommError, Connection, ConnManager, Endpoint, Message, MessageReceiver, Mode


class Collect(MessageReceiver):
    def __init__(self) -> None:
        self.received: list[bytes] = []

    def process_message(self, endpoint: Endpoint, connection: Connection, app_id: int, message: Message) -> None:
        payload = b"" if message.payload is None else bytes(message.payload)
        self.received.append(payload)
        print(endpoint.name, app_id, message.headers, message.get_header("k"), len(payload))


def main() -> int:
    server = ConnManager(Endpoint("server"), heartbeat_interval=10.0)
    receiver = Collect()
    server.register_message_receiver(1, receiver)
    handle: str = server.add_connector("tcp://127.0.0.1:8002", {}, Mode.PASSIVE)
    client = ConnManager(Endpoint("site-1", {"role": "client"}))
    client.add_connector("tcp://localhost:8002", None, Mode.ACTIVE)
    server.start()
    client.start()
    try:
        peer: Endpoint = client.wait_for_endpoint("server", timeout=5)
        client.send_message(peer, 1, {"k": "v"}, b"hello")
        client.send_message(peer, 1, None, [b"a", bytearray(b"b"), memoryview(b"c")])
    except CommError as e:
        code: str = e.code
        print(code, e.message, handle)
        return 1
    finally:
        client.stop()
        server.stop(linger=1.0)
    return len(receiver.received)
"""

# Each wrong line ends with ``# E: <mypy error code>``.
BAD = """
from sfm_core import CommError, ConnManager, Endpoint, Mode

manager = ConnManager(Endpoint(1))  # E: arg-type
manager.add_connector("tcp://localhost:8002", {}, "active")  # E: arg-type
manager.send_message("server", 1, None, b"x")  # E: arg-type
manager.send_message(manager.wait_for_endpoint("server"), "1", None, b"x")  # E: arg-type
manager.send_message(manager.wait_for_endpoint("server"), 1, None, 42)  # E: arg-type
count: int = manager.wait_for_endpoint("server")  # E: assignment
manager.start(timeout=1)  # E: call-arg
raise CommError(404)  # E: arg-type
"""


def _mypy(tmp_path: Path, name: str, source: str) -> tuple[int, str]:
    script = tmp_path / name
    script.write_text(textwrap.dedent(source))
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--show-error-codes",
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            name,
        ],
        cwd=tmp_path,  # outside the checkout: sfm_core is found as installed, not from the cwd
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_strict_mypy_sees_the_public_api(tmp_path: Path) -> None:
    rc, out = _mypy(tmp_path, "user_script.py", GOOD)
    assert "[import-" not in out, (
        "mypy does not see the installed sfm_core (an editable install needs "
        "`--config-settings editable_mode=compat`, as the README's commands do):\n" + out
    )
    assert rc == 0, f"mypy --strict rejects a correct user script:\n{out}"

    rc, out = _mypy(tmp_path, "wrong_calls.py", BAD)
    assert rc == 1, f"mypy --strict should reject the wrong calls (exit {rc}):\n{out}"
    want = {
        i: m.group(1)
        for i, line in enumerate(textwrap.dedent(BAD).splitlines(), 1)
        if (m := re.search(r"# E: ([a-z-]+)$", line))
    }
    got: dict[int, set[str]] = {}
    for m in re.finditer(r"^wrong_calls\.py:(\d+): error: .*\[([a-z-]+)\]$", out, re.MULTILINE):
        got.setdefault(int(m.group(1)), set()).add(m.group(2))
    missed = {line: code for line, code in want.items() if code not in got.get(line, set())}
    unexpected = sorted(set(got) - set(want))
    assert not missed and not unexpected, f"missed {missed}, unexpected errors on lines {unexpected}:\n{out}"
