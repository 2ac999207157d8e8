"""The checks every chunk and result frame passes first, and what a refusal costs.

Before its role looks at a frame, ``Admission`` asks, in this order (protocol/averaging.md
sections 7.1 and 8.1): does the frame name the peer at the other end of the transport as its
signer; does the signature verify; is it for this run and round (a replay is not); is it for
this group; is the signer a member. The roles then add their own checks and answer with the
same ``Refusal``.
"""

from __future__ import annotations

from dataclasses import dataclass

from dandelion_p2p.averaging.group import GroupSpec
from dandelion_p2p.averaging.messages import ChunkHeader, ResultHeader
from dandelion_p2p.identity import public_key_of, verify
from dandelion_p2p.reputation.book import ScoreEvent
from dandelion_p2p.wire import RejectCode

GROUP_MISMATCH_DETAIL = "group id differs: another view of the group"


@dataclass(frozen=True, slots=True)
class Refusal:
    """A frame refused: the ``Reject`` sent back (``code``, ``detail``), the score ``event``
    it costs the peer, and what it changes in the round."""

    code: RejectCode
    detail: str
    event: ScoreEvent = ScoreEvent.MALFORMED
    exclude: bool = False
    """Stop counting the peer as a sender to our span: its stream can no longer be trusted."""
    settle: bool = False
    """Leave the result's chunk at local values: a reducer sends each result once, so this
    chunk will not come right."""
    other_group: bool = False
    """The peer formed the group from other announcements. An honest peer whose DHT view
    differed sends exactly this, so it is not scored; but nothing it sends this round can
    match our layout, so it is given up in every role."""


class Admission:
    """The common checks of one group's round, with the signers' public keys cached."""

    def __init__(self, spec: GroupSpec) -> None:
        self._spec = spec
        self._keys: dict[bytes, bytes | None] = {}

    def check(self, sender: bytes, header: ChunkHeader | ResultHeader) -> Refusal | None:
        """None when ``header``, received from ``sender``, passes the common checks."""
        is_chunk = isinstance(header, ChunkHeader)
        noun, role = ("chunk", "sender") if is_chunk else ("result", "reducer")
        signer = header.sender if isinstance(header, ChunkHeader) else header.reducer
        if signer != sender:
            return Refusal(RejectCode.FORBIDDEN, f"{noun} signed as another peer", exclude=True)
        if not self._verified(sender, header):
            # A chunk's sender is cut off; a result only costs its chunk.
            return Refusal(
                RejectCode.BAD_SIGNATURE,
                f"{noun} signature",
                ScoreEvent.BAD_SIGNATURE,
                exclude=is_chunk,
                settle=not is_chunk,
            )
        if header.run != self._spec.run or header.round != self._spec.round:
            # A replay (or a frame of another round routed here): it says nothing about this
            # round's frames, so the peer stays in.
            return Refusal(RejectCode.UNEXPECTED, f"{noun} of round {header.round}")
        if header.group_id != self._spec.group_id:
            return Refusal(RejectCode.OTHER_GROUP, GROUP_MISMATCH_DETAIL, other_group=True)
        if sender not in self._spec:
            return Refusal(RejectCode.FORBIDDEN, f"{role} is not a member")
        return None

    def _verified(self, peer: bytes, header: ChunkHeader | ResultHeader) -> bool:
        if peer in self._keys:
            key = self._keys[peer]
        else:
            key = public_key_of(peer)
            if peer in self._spec:
                self._keys[peer] = key
        return key is not None and verify(key, header.signed_bytes(), header.signature)
