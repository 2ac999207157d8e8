"""How many inbound channels remote peers may hold open at once.

Every channel buffers what its peer sends up to the credit window we grant (32 MiB by default)
until the consumer takes it, so the number of channels others can open is a bound on our
memory: per peer, per network (``networks.network_of``: fresh identities are free, networks
are not) and in total. A channel over a bound is refused before its handshake.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

K = TypeVar("K")

# An honest peer holds one channel per round with each member, kept idle between rounds
# (averaging/2): the current round's, one still closing or resting and a retry fit in 8. A
# group is at most 64 members as formed (averaging's candidate_group); an averager keeps idle
# only the channels of members of its last round, and the round before may still be closing:
# 256 in total.
DEFAULT_CHANNELS_PER_PEER = 8
DEFAULT_CHANNELS_PER_NETWORK = 64
DEFAULT_CHANNELS_TOTAL = 256


@dataclass(frozen=True, slots=True)
class ChannelLimits:
    per_peer: int = DEFAULT_CHANNELS_PER_PEER
    per_network: int = DEFAULT_CHANNELS_PER_NETWORK
    total: int = DEFAULT_CHANNELS_TOTAL

    def __post_init__(self) -> None:
        if not 1 <= self.per_peer <= self.per_network <= self.total:
            raise ValueError("need 1 <= per_peer <= per_network <= total")


class ChannelSlots:
    """Open inbound channels, counted by peer and by network."""

    def __init__(self, limits: ChannelLimits | None = None) -> None:
        self.limits = limits or ChannelLimits()
        self.refused = 0
        self._per_peer: dict[bytes, int] = {}
        self._per_network: dict[str, int] = {}
        self._total = 0

    def take(self, peer: bytes, network: str) -> str | None:
        """Count a new channel from ``peer`` on ``network``; None when taken, else which bound
        refused it (the caller refuses the channel and must not ``give_back``)."""
        lim = self.limits
        if self._total >= lim.total:
            refusal: str | None = "total"
        elif self._per_network.get(network, 0) >= lim.per_network:
            refusal = "network"
        elif self._per_peer.get(peer, 0) >= lim.per_peer:
            refusal = "peer"
        else:
            refusal = None
        if refusal is not None:
            self.refused += 1
            return refusal
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        self._per_network[network] = self._per_network.get(network, 0) + 1
        self._total += 1
        return None

    def give_back(self, peer: bytes, network: str) -> None:
        """A channel counted by ``take`` ended."""
        _decrement(self._per_peer, peer)
        _decrement(self._per_network, network)
        self._total = max(0, self._total - 1)

    @property
    def held(self) -> int:
        return self._total

    def held_by(self, peer: bytes) -> int:
        return self._per_peer.get(peer, 0)


def _decrement(counts: dict[K, int], key: K) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
