"""websockets (its asyncio API, as the driver uses it): one binary message per ``send``."""

from __future__ import annotations

import asyncio
from typing import Any

from . import Buffer, missing, version

#: The core's frame limit: the bare runs accept messages as large as sfm's.
_MAX = 2 * 1024**3 - 2 * 1024**2
_OPTIONS: dict[str, Any] = {"max_size": _MAX, "compression": None, "ping_interval": None}


class WsLink:
    """One WebSocket connection; ``closed`` is set when it is closed (the server's handler waits on it)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.closed = asyncio.Event()

    async def send(self, payload: Buffer) -> None:
        """One binary message."""
        await self.ws.send(payload)

    async def recv(self) -> Buffer:
        """The next message."""
        return await self.ws.recv()

    async def close(self) -> None:
        """Close the connection."""
        try:
            await self.ws.close()
        finally:
            self.closed.set()


class WsListener:
    """A ``websockets.asyncio.server``; each connection is handed to ``accept``."""

    def __init__(self) -> None:
        self.links: asyncio.Queue[WsLink] = asyncio.Queue()
        self.server: Any = None
        self.address = ""

    async def start(self) -> WsListener:
        from websockets.asyncio.server import serve

        async def handler(ws: Any) -> None:
            link = WsLink(ws)
            await self.links.put(link)
            await link.closed.wait()  # the connection lives as long as the handler

        self.server = await serve(handler, "127.0.0.1", 0, **_OPTIONS)
        self.address = f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/"
        return self

    async def accept(self, timeout: float) -> WsLink:
        """The first connection."""
        return await asyncio.wait_for(self.links.get(), timeout)

    async def close(self) -> None:
        """Stop the server."""
        self.server.close()
        await self.server.wait_closed()


class WebsocketsBaseline:
    """Bare ``websockets`` (asyncio), the baseline of ``ws`` and ``http``."""

    @property
    def name(self) -> str:
        """``bare websockets VERSION``."""
        return f"bare websockets {version('websockets')}"

    def available(self) -> str | None:
        """Only if websockets is installed."""
        return missing("websockets")

    async def listen(self) -> WsListener:
        """Serve on 127.0.0.1, any port."""
        return await WsListener().start()

    async def connect(self, address: str) -> WsLink:
        """Connect to ``ws://host:port/``."""
        from websockets.asyncio.client import connect

        return WsLink(await connect(address, **_OPTIONS))
