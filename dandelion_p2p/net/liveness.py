"""Connection liveness over real libp2p connections (the adapter of ``liveness_core``).

Every connection of the host, relayed ones included, is watched: its secured connection's
``read`` is wrapped to note when bytes arrive, a quiet one is pinged, and a dead one is
closed. The ping is a yamux ping frame, which the other side's muxer answers without a
stream; where reads cannot be watched, the libp2p ping protocol runs on a stream of that
very connection instead (``host.new_stream`` would pick any connection to the peer).

Closing a dead connection lets the rest of the node react as to any lost connection: the
relay manager drops a reservation whose relay is gone and takes another, and the next
request to a peer dials it again through a relay that answers.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from collections.abc import Callable, Hashable
from typing import Any

import trio
from libp2p.abc import IHost, INetConn
from libp2p.host.ping import ID as PING_PROTOCOL_ID
from libp2p.host.ping import perform_ping_roundtrip
from libp2p.protocol_muxer.multiselect_client import MultiselectClient
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
from libp2p.stream_muxer.yamux.yamux import FLAG_SYN, TYPE_PING, YAMUX_HEADER_FORMAT, Yamux

from dandelion_p2p.net.liveness_core import LivenessSettings, LivenessTracker

log = logging.getLogger(__name__)

# A close that has not finished by then (a GO_AWAY stuck behind a dead link) is abandoned:
# the connection is then dropped from the swarm's books and its transport closed directly.
CLOSE_TIMEOUT = 3.0
_WRAPPED = "_dandelion_liveness_wrapped"


class ConnectionLiveness:
    """Run with ``await liveness.run()`` in a nursery; ``on_dead`` is told each closed
    connection's peer (after it is closed)."""

    def __init__(
        self,
        host: IHost,
        settings: LivenessSettings | None = None,
        *,
        on_dead: Callable[[Any], None] | None = None,
    ) -> None:
        self.host = host
        self.settings = settings or LivenessSettings()
        self.tracker = LivenessTracker(self.settings)
        self.on_dead = on_dead
        self.closed_dead = 0
        """Connections closed because nothing arrived on them (shown in logs and tests)."""
        self._conns: dict[Hashable, INetConn] = {}
        self._client = MultiselectClient()
        self._watched: set[Hashable] = set()
        """Connections whose inbound bytes are noticed: pinged with yamux pings."""

    def is_quiet(self, conn: INetConn) -> bool:
        """Whether nothing has arrived on ``conn`` for a ping interval (it may be dead)."""
        key = id(conn)
        if key not in self.tracker:
            return False
        return self.tracker.quiet_for(key, trio.current_time()) >= self.settings.interval

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                self._sync(trio.current_time())
                due = self.tracker.due(trio.current_time())
                for key in due.dead:
                    conn = self._conns.pop(key, None)
                    if conn is not None:
                        nursery.start_soon(self._close_dead, conn)
                for key in due.ping:
                    conn = self._conns.get(key)
                    if conn is not None:
                        self.tracker.ping_started(key, trio.current_time())
                        nursery.start_soon(self._ping, key, conn)
                await trio.sleep(self.settings.check_every)

    def _sync(self, now: float) -> None:
        """Track new connections and forget closed ones."""
        live: dict[Hashable, INetConn] = {}
        for conn in self.host.get_network().get_connections():
            if getattr(conn, "is_closed", False):
                continue
            key = id(conn)
            live[key] = conn
            if key not in self.tracker:
                self.tracker.track(key, now)
                self._watch_reads(key, conn)
        for gone in self.tracker.tracked():
            if gone not in live:
                self.tracker.forget(gone)
        self._watched &= set(live)
        self._conns = live

    def _watch_reads(self, key: Hashable, conn: INetConn) -> None:
        secured = getattr(conn.muxed_conn, "secured_conn", None)
        if secured is None:
            return
        if getattr(secured, _WRAPPED, False):
            self._watched.add(key)
            return
        read = secured.read
        tracker = self.tracker

        async def noting_read(n: int | None = None) -> bytes:
            data = await read(n)
            if data:
                tracker.heard(key, trio.current_time())
            return data

        try:
            secured.read = noting_read
            setattr(secured, _WRAPPED, True)
            self._watched.add(key)
        except AttributeError:  # a transport with slots: pings alone then prove liveness
            log.debug("cannot watch reads of the connection to %s", conn.muxed_conn.peer_id)

    async def _ping(self, key: Hashable, conn: INetConn) -> None:
        muxed = conn.muxed_conn
        if isinstance(muxed, Yamux) and key in self._watched:
            await self._yamux_ping(key, muxed)
        else:
            await self._protocol_ping(key, conn)

    async def _yamux_ping(self, key: Hashable, muxed: Yamux) -> None:
        """A yamux ping frame: 12 bytes, no stream, answered by the other side's muxer
        itself. Its answer is noticed as inbound bytes like any other."""
        state: Any = muxed
        try:
            with trio.move_on_after(self.settings.dead_after):
                # yamux takes the answer to any ping as the answer to its own RTT probe:
                # stamping the send time keeps its RTT estimate right.
                state._ping_sent_time = trio.current_time()
                await state._write_frame(
                    struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_PING, FLAG_SYN, 0, 0)
                )
        except Exception as exc:
            log.debug("yamux ping of %s failed: %r", muxed.peer_id, exc)
        finally:
            self.tracker.ping_ended(key, trio.current_time(), answered=False)

    async def _protocol_ping(self, key: Hashable, conn: INetConn) -> None:
        answered = False
        stream = None
        try:
            with trio.move_on_after(self.settings.dead_after):
                stream = await conn.new_stream()
                await self._client.select_one_of(
                    [PING_PROTOCOL_ID],
                    MultiselectCommunicator(stream),
                    int(self.settings.dead_after),
                )
                stream.set_protocol(PING_PROTOCOL_ID)
                await perform_ping_roundtrip(stream)
                answered = True
        except Exception as exc:  # a dead or closing connection fails in many ways
            log.debug("ping of %s failed: %r", conn.muxed_conn.peer_id, exc)
        finally:
            if stream is not None:
                with trio.move_on_after(1.0):
                    with contextlib.suppress(Exception):
                        await stream.close() if answered else await stream.reset()
            self.tracker.ping_ended(key, trio.current_time(), answered=answered)

    async def _close_dead(self, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id
        relayed = any("/p2p-circuit" in str(a) for a in conn.get_transport_addresses())
        log.warning(
            "%s connection to %s silent for %.0f s: closing it",
            "relayed" if relayed else "direct",
            peer,
            self.settings.dead_after,
        )
        self.closed_dead += 1
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            try:
                await conn.close()
            except Exception as exc:
                log.debug("closing the connection to %s: %r", peer, exc)
        if scope.cancelled_caught:
            await self._abandon(conn)
        if self.on_dead is not None:
            self.on_dead(peer)

    async def _abandon(self, conn: INetConn) -> None:
        swarm: Any = self.host.get_network()
        try:
            swarm.remove_conn(conn)
        except Exception as exc:
            log.debug("dropping a stuck connection: %r", exc)
        secured = getattr(conn.muxed_conn, "secured_conn", None)
        if secured is not None:
            with trio.move_on_after(CLOSE_TIMEOUT):
                with contextlib.suppress(Exception):
                    await secured.close()
