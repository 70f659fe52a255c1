"""websockets (its threaded ``websockets.sync`` API): one binary message per ``send``.

The sync API keeps the adapter a plain blocking link like the others; the driver uses the
asyncio API, whose per-message cost is of the same library.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from . import Buffer, missing, version

#: The core's frame limit: the bare runs accept messages as large as sfm's.
_MAX = 2 * 1024**3 - 2 * 1024**2
_OPTIONS: dict[str, Any] = {"max_size": _MAX, "compression": None, "ping_interval": None}


class WsLink:
    """One WebSocket connection; ``closed`` is set when it is closed (the server's handler waits on it)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.closed = threading.Event()

    def send(self, payload: Buffer) -> None:
        """One binary message."""
        self.ws.send(payload)

    def recv(self) -> Buffer:
        """The next message."""
        return self.ws.recv()

    def close(self) -> None:
        """Close the connection."""
        try:
            self.ws.close()
        finally:
            self.closed.set()


class WsListener:
    """A ``websockets.sync.server`` serving in a thread; each connection is handed to ``accept``."""

    def __init__(self) -> None:
        from websockets.sync.server import serve

        self.links: queue.SimpleQueue[WsLink] = queue.SimpleQueue()

        def handler(ws: Any) -> None:
            link = WsLink(ws)
            self.links.put(link)
            link.closed.wait()  # the connection lives as long as the handler

        self.server = serve(handler, "127.0.0.1", 0, **_OPTIONS)
        self.address = f"ws://127.0.0.1:{self.server.socket.getsockname()[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, name="bench-ws-server", daemon=True)
        self.thread.start()

    def accept(self, timeout: float) -> WsLink:
        """The first connection."""
        return self.links.get(timeout=timeout)

    def close(self) -> None:
        """Stop the server."""
        self.server.shutdown()
        self.thread.join(10)


class WebsocketsBaseline:
    """Bare ``websockets``, the baseline of ``ws`` and ``http``."""

    @property
    def name(self) -> str:
        """``bare websockets VERSION``."""
        return f"bare websockets {version('websockets')}"

    def available(self) -> str | None:
        """Only if websockets is installed."""
        return missing("websockets")

    def listen(self) -> WsListener:
        """Serve on 127.0.0.1, any port."""
        return WsListener()

    def connect(self, address: str) -> WsLink:
        """Connect to ``ws://host:port/``."""
        from websockets.sync.client import connect

        return WsLink(connect(address, **_OPTIONS))
