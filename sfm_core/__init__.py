"""sfm_core: a message layer between named endpoints over pluggable transport drivers."""

from .conn_manager import ConnManager, NullConnection, SfmConnection, SfmEndpoint, SfmFrameReceiver
from .driver import Connection, ConnectorInfo, ConnMonitor, ConnState, Driver, FrameReceiver, Mode
from .endpoint import Endpoint, EndpointMonitor, EndpointState
from .errors import CommError, HandshakeRefused
from .frames import MAX_FRAME_SIZE, FrameDecoder, FrameType
from .hookspecs import hookimpl
from .message import Message, MessageReceiver
from .plugins import get_plugin_manager
from .registry import DriverRegistry, get_registry

__version__ = "0.1.0"

__all__ = [
    "MAX_FRAME_SIZE",
    "CommError",
    "ConnManager",
    "ConnMonitor",
    "ConnState",
    "Connection",
    "ConnectorInfo",
    "Driver",
    "DriverRegistry",
    "Endpoint",
    "EndpointMonitor",
    "EndpointState",
    "FrameDecoder",
    "FrameReceiver",
    "FrameType",
    "HandshakeRefused",
    "Message",
    "MessageReceiver",
    "Mode",
    "NullConnection",
    "SfmConnection",
    "SfmEndpoint",
    "SfmFrameReceiver",
    "get_plugin_manager",
    "get_registry",
    "hookimpl",
]
