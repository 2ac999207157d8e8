"""A second connection to a peer replaces the first without cutting its streams.

With one connection per peer allowed, py-libp2p closes the surplus connection as soon as a
new one is registered (unless both are younger than its 20 s grace period), and DCUtR closes
the relayed connection 60 s after a hole punch whatever runs on it. Either cut the streams of
an averaging round in flight when a hole punch landed late. Here the surplus connection
*drains* instead, as DCUtR's graceful close intends: it stays open, new streams go to the
connection kept (the swarm prefers direct connections, then the one with more streams), and
it is closed once it has carried no stream for ``IDLE_BEFORE_CLOSE`` seconds, or after
``DRAIN_LIMIT`` seconds whatever it carries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import trio
from libp2p.abc import IHost, INetConn
from libp2p.rcmgr import Direction
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol

log = logging.getLogger(__name__)

IDLE_BEFORE_CLOSE = 2.0
"""A draining connection is closed once it carried no stream for this long (the other side
may still open a stream on it until it has registered the new connection itself)."""
DRAIN_LIMIT = 600.0
"""A draining connection is closed after this long even with streams open: a stream
nobody closes must not keep a relay circuit forever."""
MAX_DRAINING_PER_PEER = 2
"""Replaced connections of one peer kept draining at once; a further one closes the oldest."""
POLL = 0.5


def is_relayed(conn: INetConn) -> bool:
    try:
        addrs = conn.get_transport_addresses()
    except Exception:
        return False
    return bool(addrs) and all("/p2p-circuit" in str(a) for a in addrs)


def _dialed_by_lower_id(conn: INetConn, me: bytes) -> bool:
    """Both ends of a connection agree on who dialed it, so both keep the same one of two
    direct connections (two peers that dialed each other at once) and drain the other."""
    peer = conn.muxed_conn.peer_id.to_bytes()
    outbound = getattr(conn, "direction", Direction.UNKNOWN) == Direction.OUTBOUND
    dialer = me if outbound else peer
    return dialer == min(me, peer)


def _preference(conn: INetConn, me: bytes, suspect: bool) -> tuple[bool, bool, bool, float]:
    created = getattr(conn, "_created_at", 0.0)
    return (
        not is_relayed(conn),
        not suspect,
        _dialed_by_lower_id(conn, me),
        float(created) if isinstance(created, (int, float)) else 0.0,
    )


class GracefulUpgrades:
    """Installs itself on ``host``'s swarm and ``hole_punching``; ``run`` in a nursery.

    While not running, surplus connections are trimmed as py-libp2p does.
    """

    def __init__(
        self,
        host: IHost,
        hole_punching: DCUtRProtocol,
        *,
        suspect: Callable[[INetConn], bool] = lambda conn: False,
    ) -> None:
        self.host = host
        self.suspect = suspect
        """Whether a connection has been quiet long enough to be pinged: of two, the quiet
        one is drained (a peer that re-dialled us after its end of a dead path gave up)."""
        self.drained = 0
        """Connections closed after draining (for logs and tests)."""
        self._draining: dict[int, INetConn] = {}
        self._closing: set[int] = set()
        self._nursery: trio.Nursery | None = None
        swarm: Any = host.get_network()
        self._library_trim = swarm._trim_connections
        self._library_select = swarm._select_connection
        swarm._trim_connections = self._trim
        swarm._select_connection = self._select
        hole_punching._close_relayed_conns_after_grace = self._after_hole_punch  # type: ignore[method-assign]

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def draining(self) -> int:
        return len(self._draining)

    def _trim(self, peer_id: Any) -> None:
        """Called by the swarm when a peer has more connections than allowed."""
        if self._nursery is None:
            self._library_trim(peer_id)
            return
        swarm: Any = self.host.get_network()
        conns: list[INetConn] = [
            c for c in swarm.connections.get(peer_id, []) if not self._set_aside(c)
        ]
        allowed = max(1, int(swarm.connection_config.max_connections_per_peer))
        if len(conns) <= allowed:
            return
        me = self.host.get_id().to_bytes()
        ranked = sorted(conns, key=lambda c: _preference(c, me, self.suspect(c)))
        for conn in ranked[: len(conns) - allowed]:
            self._drain(conn)

    def _select(self, connections: list[INetConn], peer_id: Any) -> INetConn:
        """The swarm's choice for a new stream, among connections not draining."""
        kept = [c for c in connections if not self._set_aside(c)]
        return self._library_select(kept or connections, peer_id)

    def _drain(self, conn: INetConn) -> None:
        if self._nursery is None or self._set_aside(conn):
            return
        peer = conn.muxed_conn.peer_id
        same_peer = [c for c in self._draining.values() if c.muxed_conn.peer_id == peer]
        if len(same_peer) >= MAX_DRAINING_PER_PEER:
            # A peer that keeps dialing us anew must not pile up connections: the one it
            # replaced first closes now.
            oldest = min(same_peer, key=lambda c: float(getattr(c, "_created_at", 0.0) or 0.0))
            del self._draining[id(oldest)]
            self._closing.add(id(oldest))
            self._nursery.start_soon(self._close_now, oldest)
        self._draining[id(conn)] = conn
        self._nursery.start_soon(self._drain_then_close, conn)

    async def _drain_then_close(self, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id
        kind = "relayed" if is_relayed(conn) else "direct"
        log.info(
            "%s connection to %s replaced; closing it once its %d streams are done",
            kind,
            peer,
            len(conn.get_streams()),
        )
        started = time.monotonic()
        idle_since: float | None = None
        try:
            while not getattr(conn, "is_closed", False):
                now = time.monotonic()
                if self._last_one(conn):
                    # The connection it gave way to is gone (closed as dead, say): keep it.
                    log.info("keeping the connection to %s: no other is left", peer)
                    return
                if conn.get_streams():
                    idle_since = None
                elif idle_since is None:
                    idle_since = now
                if idle_since is not None and now - idle_since >= IDLE_BEFORE_CLOSE:
                    break
                if now - started >= DRAIN_LIMIT:
                    log.info("closing the replaced connection to %s with streams open", peer)
                    break
                await trio.sleep(POLL)
            else:
                return
            self.drained += 1
            await self._close_now(conn)
        finally:
            self._draining.pop(id(conn), None)

    async def _close_now(self, conn: INetConn) -> None:
        try:
            with trio.move_on_after(5.0):
                try:
                    await conn.close()
                except Exception as exc:
                    log.debug("closing a replaced connection: %r", exc)
        finally:
            self._closing.discard(id(conn))

    def _set_aside(self, conn: INetConn) -> bool:
        return id(conn) in self._draining or id(conn) in self._closing

    def _last_one(self, conn: INetConn) -> bool:
        swarm: Any = self.host.get_network()
        others = [
            c
            for c in swarm.connections.get(conn.muxed_conn.peer_id, [])
            if c is not conn and not getattr(c, "is_closed", False)
        ]
        return not others

    async def _after_hole_punch(self, peer_id: Any, grace: float = 0.0) -> None:
        """DCUtR's close of the relay leg after a punch: drain it instead, once a direct
        connection is there (the swarm may already have begun to)."""
        swarm: Any = self.host.get_network()
        conns: list[INetConn] = list(swarm.connections.get(peer_id, []))
        if not any(not is_relayed(c) for c in conns):
            return
        for conn in conns:
            if is_relayed(conn):
                self._drain(conn)
