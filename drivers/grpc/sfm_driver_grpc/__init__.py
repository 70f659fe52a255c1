"""sfm-driver-grpc: the gRPC transport for sfm (``grpc://``), NVFlare's ``streamer.Streamer``."""

from .driver import GrpcDriver

__all__ = ["GrpcDriver"]
__version__ = "0.1.0"
