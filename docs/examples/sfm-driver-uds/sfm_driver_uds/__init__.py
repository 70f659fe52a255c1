"""sfm-driver-uds: Unix domain sockets for sfm (``uds:///path/to/socket``)."""

from .driver import UdsDriver

__all__ = ["UdsDriver"]
__version__ = "0.1.0"
