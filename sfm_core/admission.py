"""Admitting a peer whose handshake arrived: record it in the endpoint table, answer READY
(passive side), close the connections it replaced, and tell monitors it is READY."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from .endpoint import Endpoint
from .endpoint_table import EndpointTable, Registration
from .handshake import PeerHello, peer_from_map
from .identity import check_identity
from .sfm_connection import SfmConnection
from .tls import IDENTITY_BINDING, PEER_CN

log = logging.getLogger(__name__)


class Admission:
    """The steps of a handshake that touch the endpoint table, in the order that keeps
    peers and monitors consistent (``docs/architecture.md``)."""

    def __init__(
        self,
        table: EndpointTable,
        local_name: str,
        notify: Callable[[Endpoint], None],
        live_window: float,
        identity_map: Mapping[str, str] | None = None,
        admit: Callable[[SfmConnection, str, dict], str | None] | None = None,
    ) -> None:
        self.table = table
        #: The plugins' say (``sfm_admit_connection``): a reason to refuse, or None.
        self.admit = admit
        #: Explicit endpoint name (or prefix) -> certificate identity, for identity binding.
        self.identity_map = dict(identity_map or {})
        self.local_name = local_name
        self.notify = notify
        #: A replaced connection heard from within this many seconds was live, not stale.
        self.live_window = live_window

    def accept(self, sfm_conn: SfmConnection, peer: PeerHello) -> None:
        """Passive side: record the peer, answer READY, close what it replaced, tell monitors."""
        # Record the endpoint before READY goes out, so a peer that has READY is known here
        # (and of two connections claiming one name, the one answered last is kept). The write
        # role is held throughout: a message sent to the endpoint the moment it is known
        # still goes out after READY.
        session = sfm_conn.session
        conn_props = sfm_conn.conn.get_conn_properties()
        refused = self._refused(sfm_conn, peer, conn_props)
        if refused is not None:
            sfm_conn.refuse(session.refuse(refused))
            return
        with sfm_conn.exclusive():
            sfm_conn.conn.extensions = session.driver_extensions
            registration = self.table.register(sfm_conn, peer, conn_props)
            if registration is None:
                return  # closed while the handshake was on its way
            session.stream_ids = registration.sfm_ep.stream_ids
            try:
                sfm_conn.write_locked(session.accept(time.time()))
            except BaseException:
                self.table.undo(sfm_conn, registration)
                raise
        _handshaken(sfm_conn)
        self._settle(registration)

    def register(self, sfm_conn: SfmConnection, peer: PeerHello) -> None:
        """Active side (READY arrived): record the peer, close what it replaced, tell monitors."""
        conn_props = sfm_conn.conn.get_conn_properties()
        if self._refused(sfm_conn, peer, conn_props) is not None:
            sfm_conn.session.connection_lost("the server's identity check failed")
            sfm_conn.close()
            return
        registration = self.table.register(sfm_conn, peer, conn_props)
        if registration is not None:
            sfm_conn.session.stream_ids = registration.sfm_ep.stream_ids
            self._settle(registration)

    def update(self, sfm_conn: SfmConnection, data: dict) -> None:
        """Record a peer from a handshake map learned another way (``update_endpoint``).

        Raises ``CommError``: ``BAD_DATA`` naming what is wrong with the map, ``CLOSED`` if
        the connection is closing or closed."""
        peer = peer_from_map(data, self.local_name)
        sfm_conn.session.adopt(peer)
        sfm_conn.conn.extensions = sfm_conn.session.driver_extensions
        self.register(sfm_conn, peer)
        _handshaken(sfm_conn)

    def _refused(self, sfm_conn: SfmConnection, peer: PeerHello, conn_props: dict) -> str | None:
        """Why the peer is refused (logged), or None. On mutual TLS, the claimed name must
        resolve to the certificate's CN, and no connection takes over an endpoint bound to
        another certificate; then the plugins (``sfm_admit_connection``) have their say. A
        refused peer is closed before it is recorded or READY (NVFlare checks after READY);
        an sfm peer is told why (``refusal``)."""
        reason = None
        if conn_props.get(IDENTITY_BINDING):
            reason = check_identity(peer.name, conn_props.get(PEER_CN), self.local_name, self.identity_map)
        if reason is None:
            reason = self._takeover(peer.name, conn_props)
        if reason is None and self.admit is not None:
            reason = self.admit(sfm_conn.conn, peer.name, conn_props)
        if reason is not None:
            log.warning(
                "%s: refusing %s from %s: %s", self.local_name, sfm_conn.name, conn_props.get("peer_addr"), reason
            )
        return reason

    def _takeover(self, name: str, conn_props: dict) -> str | None:
        """Why this connection may not replace the endpoint's current one: that one is bound
        to a certificate, this one is not, or to another (say, via a plain listener)."""
        current = self.table.get(name)
        if current is None:
            return None
        mine = conn_props.get(PEER_CN) if conn_props.get(IDENTITY_BINDING) else None
        for old in current.connections:
            props = old.conn.get_conn_properties()
            if props.get(IDENTITY_BINDING) and props.get(PEER_CN) != mine:
                how = f"for {mine!r}" if mine else "without a bound certificate"
                held = props.get(PEER_CN)
                return (
                    f"endpoint {name!r} is connected with a certificate for {held!r}; "
                    f"a connection {how} may not take it over"
                )
        return None

    def _settle(self, registration: Registration) -> None:
        """Close the connections a registration replaced; tell monitors the endpoint is READY."""
        name = registration.sfm_ep.endpoint.name
        now = time.monotonic()
        for old in registration.replaced:
            if now - old.session.last_heard < self.live_window:
                # Not a stale half-open connection: two live ones claim the same name (two
                # connectors of one endpoint to us, or two processes with one name).
                log.warning(
                    "%s: a second live connection claims endpoint %r; closing the older %s, as NVFlare does "
                    "(one connection per endpoint: two connectors from one endpoint to one peer replace each other)",
                    self.local_name,
                    name,
                    old.name,
                )
            else:
                log.info("%s: %s replaced by a newer connection from %s", self.local_name, old.name, name)
            old.close()
        self.table.announce(registration)
        self.table.tell(self.notify)


def _handshaken(sfm_conn: SfmConnection) -> None:
    """A listener's connection is through its handshake: it leaves ``max_handshakes``."""
    slot = sfm_conn.conn.slot
    if slot is not None:
        slot.handshaken()
