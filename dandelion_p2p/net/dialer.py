"""Connecting to a peer by id and claimed addresses: direct first, then through a relay."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from dandelion_p2p.errors import PeerUnavailable
from dandelion_p2p.net import addrs as maddrs

log = logging.getLogger(__name__)

PEERSTORE_TTL = 3600
# After a failed dial, further dials to the same peer fail fast for this long.
FAILURE_BACKOFF = 5.0


class Dialer:
    """Bounded-time dials with a short memory of failures.

    ``relay_transport`` (a ``CircuitV2Transport``) is used for ``/p2p-circuit`` addresses;
    without it such addresses are skipped.
    """

    def __init__(self, host: IHost, *, timeout: float, relay_transport: object = None) -> None:
        self.host = host
        self.timeout = timeout
        self.relay_transport = relay_transport
        self._failed_until: dict[ID, float] = {}
        self._in_progress: dict[ID, trio.Event] = {}

    def is_connected(self, peer_id: ID) -> bool:
        return bool(self.host.get_network().get_connections(peer_id))

    async def connect(self, peer_id: ID, addrs: Sequence[str] = ()) -> None:
        """Make sure a connection to ``peer_id`` exists.

        Raises:
            PeerUnavailable: no address worked within the timeout, or the peer failed recently.
        """
        if peer_id == self.host.get_id() or self.is_connected(peer_id):
            return
        pending = self._in_progress.get(peer_id)
        if pending is not None:
            # Share one dial among concurrent callers instead of racing duplicates.
            with trio.move_on_after(self.timeout):
                await pending.wait()
            if self.is_connected(peer_id):
                return
            raise PeerUnavailable(f"dial to {peer_id} failed")
        now = trio.current_time()
        if self._failed_until.get(peer_id, 0.0) > now:
            raise PeerUnavailable(f"{peer_id} failed recently; not redialing yet")
        done = self._in_progress[peer_id] = trio.Event()
        try:
            await self._dial(peer_id, addrs)
            self._failed_until.pop(peer_id, None)
        except PeerUnavailable:
            self._failed_until[peer_id] = trio.current_time() + FAILURE_BACKOFF
            raise
        finally:
            del self._in_progress[peer_id]
            done.set()

    def _relay_connected(self, circuit: multiaddr.Multiaddr) -> bool:
        try:
            relay = str(circuit).split("/p2p-circuit")[0].rsplit("/p2p/", 1)[1]
            return self.is_connected(ID.from_base58(relay))
        except Exception:  # not a circuit address we can parse: try it last
            return False

    async def _dial(self, peer_id: ID, addrs: Sequence[str]) -> None:
        parsed = [(a, maddrs.parse(a)) for a in addrs]
        direct = [m for a, m in parsed if m is not None and not maddrs.is_relayed(a)]
        relayed = [m for a, m in parsed if m is not None and maddrs.is_relayed(a)]
        # Through relays we are connected to first: a relay whose connection was closed as
        # dead would hold each dial for the whole timeout before the next relay is tried.
        relayed.sort(key=lambda m: not self._relay_connected(m))
        errors: list[str] = []
        if direct or not relayed:
            if direct:
                self.host.get_peerstore().add_addrs(peer_id, direct, PEERSTORE_TTL)
            # py-libp2p blocks a peer for 60 s once all its addresses failed, even when we
            # now hold fresh ones (a restarted daemon): our own dial timeouts and backoff decide.
            unblock = getattr(self.host.get_network(), "unblock_peer", None)
            if unblock is not None:
                unblock(peer_id)
            try:
                with trio.fail_after(self.timeout):
                    await self.host.connect(PeerInfo(peer_id, direct))
                return
            except trio.TooSlowError:
                errors.append(f"direct dial timed out after {self.timeout} s")
            except Exception as exc:
                errors.append(f"direct: {exc}")
        if self.relay_transport is not None:
            for circuit in relayed:
                try:
                    with trio.fail_after(self.timeout):
                        await self.relay_transport.dial(circuit)  # type: ignore[attr-defined]
                    if self.is_connected(peer_id):
                        return
                    errors.append(f"relayed via {circuit}: no connection registered")
                except trio.TooSlowError:
                    errors.append(f"relayed via {circuit}: timed out")
                except Exception as exc:
                    errors.append(f"relayed via {circuit}: {exc}")
        raise PeerUnavailable(f"cannot reach {peer_id}: " + "; ".join(errors or ["no address"]))
