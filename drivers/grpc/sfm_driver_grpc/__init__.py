"""sfm-driver-grpc: the gRPC transport for sfm (``grpc://``), NVFlare's ``streamer.Streamer``."""

from .driver import GrpcDriver, sfm_bench_baseline

__all__ = ["GrpcDriver", "sfm_bench_baseline"]
__version__ = "0.1.0"
