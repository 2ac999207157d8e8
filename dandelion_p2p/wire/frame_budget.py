"""One memory budget for frames that remote peers have started but not finished sending.

A frame reader charges the budget for each body chunk as it arrives, before keeping it, and
releases the whole charge when the frame completes or the stream ends. The declared length of
a frame is never preallocated, so a peer that announces a large frame and stalls holds only
what it really sent. Three bounds apply to every charge: the process total, one peer's share,
and one network's share (IPv4 /24, IPv6 /48), so a thousand fresh identities from one network
hold no more than one network's share. The last eighth of the total is kept for peers that
hold almost nothing (a request or two of ordinary size), so identities spread over many
networks that fill the rest still leave room for an honest newcomer's request.
Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

Key = TypeVar("Key", bytes, str)

DEFAULT_TOTAL_BYTES = 64 * 1024 * 1024
DEFAULT_PER_PEER_BYTES = 8 * 1024 * 1024
DEFAULT_PER_NETWORK_BYTES = 16 * 1024 * 1024
# What a peer may hold when only the reserved part of the total is left.
DEFAULT_SMALL_HOLDER_BYTES = 64 * 1024


@dataclass(frozen=True)
class FrameBudgetLimits:
    total_bytes: int = DEFAULT_TOTAL_BYTES
    per_peer_bytes: int = DEFAULT_PER_PEER_BYTES
    per_network_bytes: int = DEFAULT_PER_NETWORK_BYTES
    small_holder_bytes: int = DEFAULT_SMALL_HOLDER_BYTES

    @property
    def reserved_bytes(self) -> int:
        return self.total_bytes // 8

    def __post_init__(self) -> None:
        if not 0 < self.per_peer_bytes <= self.per_network_bytes <= self.total_bytes:
            raise ValueError("frame budget needs 0 < per_peer <= per_network <= total")

    @classmethod
    def from_total(cls, total_bytes: int) -> FrameBudgetLimits:
        """A total with the default proportions: a peer gets 1/8 of it, a network 1/4."""
        return cls(total_bytes, max(1, total_bytes // 8), max(1, total_bytes // 4))


class FrameBudget:
    """Counts bytes of partly received frames per peer, per network and in total."""

    def __init__(self, limits: FrameBudgetLimits | None = None) -> None:
        self.limits = limits or FrameBudgetLimits()
        self.used = 0
        self.peak = 0
        self.refused = 0
        self._by_peer: dict[bytes, int] = {}
        self._by_network: dict[str, int] = {}

    def try_charge(self, peer: bytes, network: str, n: int) -> bool:
        """Charge ``n`` bytes if every bound allows it; False (and nothing charged) if not."""
        peer_used = self._by_peer.get(peer, 0)
        network_used = self._by_network.get(network, 0)
        limits = self.limits
        within_open_part = self.used + n <= limits.total_bytes - limits.reserved_bytes
        small_holder = peer_used + n <= limits.small_holder_bytes
        if (
            self.used + n > limits.total_bytes
            or not (within_open_part or small_holder)
            or peer_used + n > limits.per_peer_bytes
            or network_used + n > limits.per_network_bytes
        ):
            self.refused += 1
            return False
        self._by_peer[peer] = peer_used + n
        self._by_network[network] = network_used + n
        self.used += n
        self.peak = max(self.peak, self.used)
        return True

    def release(self, peer: bytes, network: str, n: int) -> None:
        if n <= 0:
            return
        self.used -= n
        _decrease(self._by_peer, peer, n)
        _decrease(self._by_network, network, n)

    def configure(self, limits: FrameBudgetLimits) -> None:
        """New bounds; what is already charged stays charged and is released as before."""
        self.limits = limits

    def held_by(self, peer: bytes) -> int:
        return self._by_peer.get(peer, 0)

    def held_by_network(self, network: str) -> int:
        return self._by_network.get(network, 0)


def _decrease(counts: dict[Key, int], key: Key, n: int) -> None:
    left = counts.get(key, 0) - n
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


# Every frame reader of this process charges this one budget.
PROCESS_FRAME_BUDGET = FrameBudget()
