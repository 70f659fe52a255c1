"""A listener in a process of its own, for the checks where one process is not enough.

``python -m sfm_core.testing.peer --url URL --name NAME [--params JSON] [--manager JSON]``
starts a ConnManager named NAME listening on URL (with connector params JSON), prints
``LISTENING <the URL the listener reports>`` on stdout, and sends every message it receives
on app_id 1 back to its sender, until its stdin closes or it gets SIGTERM. Then it stops
the manager and exits 0 (2 if it could not listen, with the reason on stderr).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from sfm_core import CommError, ConnManager, Endpoint, Mode

from .helpers import Echo, scaled

ECHO_APP = 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sfm_core.testing.peer")
    ap.add_argument("--url", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--params", default="{}", help="connector params (JSON)")
    ap.add_argument("--manager", default="{}", help="ConnManager keyword arguments (JSON)")
    args = ap.parse_args(argv)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    manager = ConnManager(Endpoint(args.name, {"role": "conformance-peer"}), **json.loads(args.manager))
    echo = Echo(manager)
    manager.register_message_receiver(ECHO_APP, echo)
    try:
        handle = manager.add_connector(args.url, json.loads(args.params), Mode.PASSIVE)
        manager.start()
        url = manager.wait_listening(handle, scaled(10))
    except CommError as e:
        print(f"cannot listen on {args.url}: {e}", file=sys.stderr, flush=True)
        manager.stop(linger=0)
        echo.close()
        return 2
    print(f"LISTENING {url}", flush=True)

    def stdin_closed() -> None:
        sys.stdin.read()
        done.set()

    threading.Thread(target=stdin_closed, daemon=True).start()
    done.wait()
    manager.stop(linger=1.0)
    echo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
