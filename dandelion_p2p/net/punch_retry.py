"""Hole punches tried again later, while a peer is reachable only through a relay.

py-libp2p's DCUtR makes at most ``MAX_HOLE_PUNCH_ATTEMPTS`` (3) punches per peer, every 2 s
while the connection is relayed, and resets that budget only when the peer disconnects. Three
punches take about 20 s, so a path that opens later (a NAT mapping that needed a retry, a
firewall rule lifted, a busy peer) is never used while the relayed connection lives, however
long that is. Here a peer whose budget is spent and whose connections are all still relayed
gets a new budget after ``RETRY_AFTER`` seconds, then twice as long each time, up to
``RETRY_MAX``: a relayed peer costs at most three failed punches per period.

DCUtR also starts a punch from both ends of a relayed connection, every 2 s each: when both
sessions overlap (a slow relay makes that likely), each peer dials the other twice from its
listen port, the second dial fails on the 4-tuple the first holds (``EADDRNOTAVAIL``), and a
connection that does form carries two handshakes in opposite roles. Only the peer with the
smaller id starts punches here (``drives_punch``); the other answers them.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.relay.circuit_v2.dcutr import MAX_HOLE_PUNCH_ATTEMPTS, DCUtRProtocol

from dandelion_p2p.net.upgrade import is_relayed

log = logging.getLogger(__name__)

RETRY_AFTER = 20.0
"""Seconds from a spent budget to the next one (then doubled each time)."""
RETRY_MAX = 320.0
POLL = 2.0


def drives_punch(me: bytes, peer: bytes) -> bool:
    """Whether this end of a relayed connection starts the hole punches: the smaller id."""
    return me < peer


class PunchSchedule:
    """When each relayed peer's spent hole-punch budget is renewed (no I/O, no clock)."""

    def __init__(self) -> None:
        self._spent: dict[Any, float] = {}
        """Per relayed peer, when its budget was seen spent."""
        self._wait: dict[Any, float] = {}
        """Per relayed peer, the wait from a spent budget to the next one."""

    def renew(self, peers: dict[Any, tuple[bool, bool]], now: float) -> list[Any]:
        """``peers``: every connected peer, with (all its connections relayed, its budget
        spent). Returns the peers whose budget to renew now; forgets peers no longer
        connected or no longer relayed only (DCUtR counts their punches afresh)."""
        for peer in list(self._wait):
            if not peers.get(peer, (False, False))[0]:
                self._wait.pop(peer, None)
                self._spent.pop(peer, None)
        due = []
        for peer, (relayed, spent) in peers.items():
            if not (relayed and spent):
                continue
            since = self._spent.setdefault(peer, now)
            wait = self._wait.setdefault(peer, RETRY_AFTER)
            if now - since >= wait:
                del self._spent[peer]
                self._wait[peer] = min(2 * wait, RETRY_MAX)
                due.append(peer)
        return due

    def tracked(self) -> int:
        return len(self._wait)


class PunchRetries:
    """Gives relayed peers a new hole-punch budget now and then; ``run`` in a nursery."""

    def __init__(self, host: IHost, hole_punching: DCUtRProtocol) -> None:
        self.host = host
        self.hole_punching = hole_punching
        self.schedule = PunchSchedule()
        self.renewed = 0
        """Budgets renewed (for logs and tests)."""
        me = host.get_id().to_bytes()
        library_initiate = hole_punching.initiate_hole_punch

        async def initiate(peer_id: Any) -> bool:
            if not drives_punch(me, peer_id.to_bytes()):
                return False  # the peer starts them; ours are answered by the DCUtR handler
            return await library_initiate(peer_id)

        hole_punching.initiate_hole_punch = initiate  # type: ignore[method-assign]

    async def run(self) -> None:
        while True:
            await trio.sleep(POLL)
            try:
                self.check(trio.current_time())
            except Exception as exc:  # a library change must not end the node's nursery
                log.debug("hole punch retry check failed: %r", exc)

    def check(self, now: float) -> None:
        swarm: Any = self.host.get_network()
        connections: dict[Any, list[Any]] = dict(getattr(swarm, "connections", {}) or {})
        # DCUtR keeps its budget and sessions in private fields; it offers no other way.
        attempts: dict[Any, int] = self.hole_punching._hole_punch_attempts
        in_progress: set[Any] = self.hole_punching._in_progress
        peers = {}
        for peer, conns in connections.items():
            live = [c for c in conns if not getattr(c, "is_closed", False)]
            relayed = bool(live) and all(is_relayed(c) for c in live)
            spent = attempts.get(peer, 0) >= MAX_HOLE_PUNCH_ATTEMPTS and peer not in in_progress
            peers[peer] = (relayed, spent)
        for peer in self.schedule.renew(peers, now):
            attempts.pop(peer, None)
            self.renewed += 1
            log.info("hole punching %s again (still relayed after %d punches)", peer,
                     MAX_HOLE_PUNCH_ATTEMPTS)
