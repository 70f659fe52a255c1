"""sfm-driver-websocket: the WebSocket transport for sfm (``ws://``, ``http://``)."""

from .driver import WebSocketDriver, sfm_bench_baseline

__all__ = ["WebSocketDriver", "sfm_bench_baseline"]
__version__ = "0.1.0"
