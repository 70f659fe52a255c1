"""sfm-driver-websocket: the WebSocket transport for sfm (``ws://``, ``http://``)."""

from .driver import WebSocketDriver

__all__ = ["WebSocketDriver"]
__version__ = "0.1.0"
