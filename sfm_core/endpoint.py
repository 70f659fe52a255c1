"""Endpoints: the named parties that exchange messages, and the monitors told of their state."""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import IntEnum
from typing import Any


class EndpointState(IntEnum):
    """Lifecycle of a remote endpoint, as seen by the local one."""

    IDLE = 0
    READY = 1
    CLOSING = 2
    DISCONNECTED = 3
    ERROR = 4


class Endpoint:
    """A named endpoint. ``properties`` are public and sent to peers in the handshake."""

    def __init__(self, name: str, properties: dict | None = None, conn_props: dict | None = None) -> None:
        self.name = name
        self.state = EndpointState.IDLE
        self.properties: dict[str, Any] = dict(properties) if properties else {}
        #: Connection properties of the first connection (peer address, certificate, ...).
        self.conn_props: dict[str, Any] = dict(conn_props) if conn_props else {}

    def set_prop(self, key: str, value: Any) -> None:
        self.properties[key] = value

    def get_prop(self, key: str) -> Any:
        return self.properties.get(key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Endpoint) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"Endpoint({self.name!r}, state={self.state.name})"


class EndpointMonitor(ABC):
    """Told whenever a remote endpoint changes state (READY on handshake, DISCONNECTED when gone)."""

    @abstractmethod
    def state_change(self, endpoint: Endpoint) -> None:
        """Called in the order the changes happened, one call at a time, on whichever core
        thread decided the change (possibly a driver's I/O thread); ``endpoint.state`` is the
        new state. Must return quickly."""
