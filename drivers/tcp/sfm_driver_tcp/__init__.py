"""sfm-driver-tcp: the TCP transport for sfm (``tcp://``, and ``stcp://`` over TLS)."""

from .driver import TcpDriver

__all__ = ["TcpDriver"]
__version__ = "0.1.0"
