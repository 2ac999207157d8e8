"""A closed run's admission list (run config ``[admission]``): who may take part."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from dandelion_p2p.identity import PeerId, public_key_of

MAX_ADMITTED = 128
"""Peer ids a closed run lists (``admission.peers``); a published config holds about 100 in
its 7 KiB (``publication.MAX_TOML_BYTES``)."""
NOT_ADMITTED = "not admitted: this run is closed to peers its config does not list"
"""The detail of the ``FORBIDDEN`` a closed run's servers answer outsiders with."""


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    peers: tuple[str, ...] = ()
    """A closed run: the base58 peer ids admitted to average, lease chunks and fetch state;
    every other peer is ignored by matchmaking and refused by the run's servers. Empty: the
    run is open to anyone who finds it."""

    def admitted(self) -> frozenset[bytes] | None:
        """The admitted peer ids as bytes, or None for an open run."""
        return admitted_ids(self.peers) if self.peers else None

    def admits(self, peer: bytes) -> bool:
        """Whether ``peer`` (a binary peer id) may take part: always in an open run."""
        admitted = self.admitted()
        return admitted is None or peer in admitted


@functools.lru_cache(maxsize=16)
def admitted_ids(peers: tuple[str, ...]) -> frozenset[bytes]:
    """Base58 peer ids as binary ones (``ValueError`` for one that is not). Read on every
    request a run's servers answer: decoded once per list."""
    return frozenset(PeerId.from_base58(p).to_bytes() for p in peers)


def is_ed25519_peer_id(text: str) -> bool:
    try:
        return public_key_of(PeerId.from_base58(text)) is not None
    except ValueError:
        return False
