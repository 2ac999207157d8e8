"""Averaging groups: what every member must agree on, and how groups form without a leader.

A ``GroupSpec`` is the complete input of one group's round: run, round, and each member's
weight, bandwidth and reachability, together with the partition parameters. Its ``group_id``
hashes all of it, and every chunk and result carries that id, so two peers that assembled the
group from different announcements (the DHT is only eventually consistent) find out at the
first frame instead of averaging mismatched spans.

``form_groups`` turns the announcements one peer sees into groups by a fixed rule (no
election, no coordinator): drop what is banned or invalid, order the rest by a hash of
(run, round, peer id), which reshuffles every round so nobody keeps the same neighbours or
always lands in the short group, and cut that order into as few groups as the maximum size
allows, sizes as even as possible.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import blake3
import msgpack

from dandelion_p2p.averaging.messages import (
    MAX_GROUP_SIZE,
    AveragingAnnouncement,
    check_peer_id,
    check_round,
    check_run,
)
from dandelion_p2p.averaging.partition import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_MIN_BANDWIDTH_FRACTION,
    Partition,
    PeerBandwidth,
    partition,
)
from dandelion_p2p.identity import MAX_PEER_ID_SIZE, MIN_PEER_ID_SIZE
from dandelion_p2p.runconfig.schema import DEFAULT_MAX_WEIGHT

GROUP_DOMAIN = b"dandelion/avg-group/v1"
# A member may weigh at most this many times the round's median announced weight.
DEFAULT_WEIGHT_SPREAD = 2.0

ORDER_DOMAIN = b"dandelion/avg-order/v1"
EXCLUSION_DOMAIN = b"dandelion/avg-exclusion/v1"


@dataclass(frozen=True, slots=True)
class Member:
    """One member as announced: ``weight`` in samples (finite, > 0), ``bandwidth`` in the unit
    the whole group shares (Mbit/s from announcements; finite, >= 0)."""

    peer_id: bytes
    weight: float
    bandwidth: float
    accepts_connections: bool = True

    def __post_init__(self) -> None:
        check_peer_id(self.peer_id, "Member")
        if not (math.isfinite(self.weight) and self.weight > 0.0):
            raise ValueError(f"member weight must be finite and > 0, got {self.weight!r}")
        if not (math.isfinite(self.bandwidth) and self.bandwidth >= 0.0):
            raise ValueError(f"member bandwidth must be finite and >= 0, got {self.bandwidth!r}")


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """The members of one group for one round, in peer id order, and the partition inputs.

    Raises ``ValueError`` (via ``invalid`` for the run and round) when the members are not
    sorted and unique, there are none or more than ``MAX_GROUP_SIZE``, or a parameter is out
    of range: specs are built locally from validated announcements, so these are local bugs.
    """

    run: bytes
    round: int
    members: tuple[Member, ...]
    block_size: int = DEFAULT_BLOCK_SIZE
    min_bandwidth_fraction: float = DEFAULT_MIN_BANDWIDTH_FRACTION
    excluded: tuple[bytes, ...] = ()
    """Members of the group as formed that this round leaves out (``without``) or seats at
    another table (``seat``), sorted."""
    formed_id: bytes = b""
    """The ``group_id`` of the group as formed, when ``excluded`` is not empty."""
    group_id: bytes = field(init=False)
    _index: dict[bytes, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_run(self.run, "GroupSpec")
        check_round(self.round, "GroupSpec")
        if not 0 < len(self.members) <= MAX_GROUP_SIZE:
            raise ValueError(f"a group has 1..{MAX_GROUP_SIZE} members, got {len(self.members)}")
        ids = [m.peer_id for m in self.members]
        if any(a >= b for a, b in itertools.pairwise(ids)):
            raise ValueError("members must be sorted by peer id, without duplicates")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 0.0 <= self.min_bandwidth_fraction <= 1.0:
            raise ValueError("min_bandwidth_fraction must be in [0, 1]")
        if any(a >= b for a, b in itertools.pairwise(self.excluded)):
            raise ValueError("excluded peers must be sorted, without duplicates")
        if set(self.excluded) & set(ids):
            raise ValueError("an excluded peer cannot be a member")
        object.__setattr__(self, "group_id", _group_id(self))
        object.__setattr__(self, "_index", {p: i for i, p in enumerate(ids)})

    @classmethod
    def of(
        cls,
        run: bytes,
        round_: int,
        members: Collection[Member],
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        min_bandwidth_fraction: float = DEFAULT_MIN_BANDWIDTH_FRACTION,
    ) -> GroupSpec:
        """A spec over ``members`` in any order."""
        ordered = tuple(sorted(members, key=lambda m: m.peer_id))
        return cls(run, round_, ordered, block_size, min_bandwidth_fraction)

    @property
    def peer_ids(self) -> tuple[bytes, ...]:
        return tuple(m.peer_id for m in self.members)

    def index_of(self, peer_id: bytes) -> int:
        """Position of ``peer_id`` among the members; raises ``KeyError`` for a non-member."""
        return self._index[peer_id]

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._index

    def member(self, peer_id: bytes) -> Member:
        return self.members[self._index[peer_id]]

    def without(self, excluded: Collection[bytes]) -> GroupSpec:
        """This group with ``excluded`` members left out of the round: the spans are cut
        among the others only, and the id changes to H(formed group id, sorted excluded ids),
        so two members whose exclusions differ refuse each other's frames as another group
        instead of mixing values of different layouts. Same spec and same set, same result;
        an empty set (after dropping non-members) returns this spec.

        Raises ``ValueError`` when nothing would be left, or on a spec already narrowed.
        """
        if self.excluded:
            raise ValueError("a group is narrowed once, from the group as formed")
        dropped = tuple(sorted(set(excluded) & set(self._index)))
        if not dropped:
            return self
        kept = tuple(m for m in self.members if m.peer_id not in dropped)
        return GroupSpec(
            self.run,
            self.round,
            kept,
            self.block_size,
            self.min_bandwidth_fraction,
            excluded=dropped,
            formed_id=self.group_id,
        )

    def seat(self, me: bytes, max_size: int) -> GroupSpec:
        """The table of at most ``max_size`` members that ``me`` averages with, when more
        than that are left in this group.

        Groups form from announcements, which cost a fresh identity nothing; only after the
        channels settle is it known who actually answers. So the group as formed is larger
        than one table, the unreachable are left out (``without``), and what is left is cut
        into tables in the round's order (``order_key``), sizes as even as possible: a crowd
        of announcers that never connect cannot spread the honest members over tables of
        their own. Every member that left out the same peers seats everyone alike; the id
        folds in everyone not at the table, so a member that seated differently is refused
        as another group. ``me`` is seated even alone: that is its round.

        Raises ``KeyError`` when ``me`` is not a member and ``ValueError`` when ``max_size`` < 1.
        """
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        if me not in self._index:
            raise KeyError(me)
        if len(self.members) <= max_size:
            return self
        ordered = sorted(self.members, key=lambda m: order_key(self.run, self.round, m.peer_id))
        at = 0
        table: list[Member] = []
        for size in group_sizes(len(ordered), 1, max_size):
            table = ordered[at : at + size]
            at += size
            if any(m.peer_id == me for m in table):
                break
        seated = {m.peer_id for m in table}
        elsewhere = set(self._index) - seated
        return GroupSpec(
            self.run,
            self.round,
            tuple(sorted(table, key=lambda m: m.peer_id)),
            self.block_size,
            self.min_bandwidth_fraction,
            excluded=tuple(sorted(set(self.excluded) | elsewhere)),
            formed_id=self.formed_id or self.group_id,
        )

    def partition(self, n_elements: int) -> Partition:
        """The span partition of an ``n_elements`` vector among the members (partition.py)."""
        return partition(
            n_elements,
            [PeerBandwidth(m.peer_id, m.bandwidth, m.accepts_connections) for m in self.members],
            block_size=self.block_size,
            min_bandwidth_fraction=self.min_bandwidth_fraction,
        )


def _group_id(spec: GroupSpec) -> bytes:
    if spec.excluded:
        narrowed = msgpack.packb(
            [EXCLUSION_DOMAIN, spec.formed_id, list(spec.excluded)], use_bin_type=True
        )
        return blake3.blake3(narrowed).digest()
    canonical = msgpack.packb(
        [
            GROUP_DOMAIN,
            spec.run,
            spec.round,
            spec.block_size,
            float(spec.min_bandwidth_fraction),
            [
                [m.peer_id, float(m.weight), float(m.bandwidth), m.accepts_connections]
                for m in spec.members
            ],
        ],
        use_bin_type=True,
    )
    return blake3.blake3(canonical).digest()


def order_key(run: bytes, round_: int, peer_id: bytes) -> bytes:
    """Where ``peer_id`` falls in round ``round_``'s order: BLAKE3 of a canonical encoding, so
    nobody can choose a peer id that sorts first in every round."""
    return blake3.blake3(
        msgpack.packb([ORDER_DOMAIN, run, round_, peer_id], use_bin_type=True)
    ).digest()


def group_sizes(n: int, min_size: int, max_size: int) -> list[int]:
    """Sizes of the groups ``n`` peers form: as few groups as ``max_size`` allows, sizes
    differing by at most one, larger first; when no split keeps everyone within
    ``[min_size, max_size]``, as many full groups as ``min_size`` allows and the rest
    (fewer than ``min_size``) left out."""
    if not 1 <= min_size <= max_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    fewest = -(-n // max_size)
    most = n // min_size
    if fewest <= most:
        # With fewest <= n // min_size groups, n // fewest >= min_size: everyone fits.
        base, extra = divmod(n, fewest) if fewest else (0, 0)
        return [base + 1] * extra + [base] * (fewest - extra)
    # Fewer than min_size peers remain once `most` groups are full; they cannot form a group.
    return [max_size] * most


@dataclass(frozen=True, slots=True)
class Formation:
    """The outcome of ``form_groups``: the groups, the eligible peers left over (too few for
    another group), and the peers not eligible with the reason."""

    groups: tuple[GroupSpec, ...]
    ungrouped: tuple[bytes, ...]
    rejected: tuple[tuple[bytes, str], ...]
    overclaimed: tuple[bytes, ...] = ()
    """Peers that announced more weight than the run's ``max_weight``: clipped, and a
    violation (an honest worker never claims more samples than the run allows)."""

    def group_of(self, peer_id: bytes) -> GroupSpec | None:
        for group in self.groups:
            if peer_id in group:
                return group
        return None


def consensus_bans(
    announcements: Mapping[bytes, AveragingAnnouncement],
    track_recorded: Collection[bytes] | None = None,
    *,
    me: bytes | None = None,
) -> frozenset[bytes]:
    """Peers banned by more than half of the track-recorded other announcers of a round.

    Identities are free, so a vote counts only from a publisher in ``track_recorded`` (peers
    whose past rounds verified in our own score book); ``None`` counts every publisher (for
    callers without a book). The majority is taken over the track-recorded announcers other
    than the accused, so a crowd of fresh keys neither votes nor dilutes the vote. ``me`` is
    never banned by others' votes: a peer does not evict itself from its own round. A peer
    banned only by a minority stays grouped, and each of its accusers leaves it out of its
    own sums and sends it nothing (``AllReducePeer.leave_out``).
    """
    voters = frozenset(p for p in announcements if track_recorded is None or p in track_recorded)
    accusations: dict[bytes, int] = {}
    for publisher in voters:
        for accused in set(announcements[publisher].banned):
            if accused != publisher and accused in announcements and accused != me:
                accusations[accused] = accusations.get(accused, 0) + 1
    return frozenset(p for p, votes in accusations.items() if 2 * votes > len(voters - {p}))


def bounded_weights(
    weights: Mapping[bytes, float], max_weight: float, spread: float = DEFAULT_WEIGHT_SPREAD
) -> dict[bytes, float]:
    """Announced weights clipped to ``min(max_weight, spread * median)``.

    The run's ``max_weight`` bounds what anyone may claim; the median term bounds a lone
    liar by what the round's typical member announced, so one member's share stays near an
    honest newcomer's whatever it claims. Deterministic over the same announcements.
    """
    if not weights:
        return {}
    ordered = sorted(weights.values())
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0
    cap = min(max_weight, spread * median)
    return {p: min(w, cap) for p, w in weights.items()}


def bounded_bandwidths(members: Collection[Member]) -> list[Member]:
    """Members with announced bandwidth clipped to the group's median announcement.

    Bandwidth is a claim nobody has measured when the group forms; sizing spans by it
    would let one liar take the whole vector and drop it. At the median, a liar reduces
    at most as much as a typical member of its group.
    """
    if not members:
        return []
    ordered = sorted(m.bandwidth for m in members)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0
    return [
        Member(m.peer_id, m.weight, min(m.bandwidth, median), m.accepts_connections)
        for m in members
    ]


def form_groups(
    announcements: Mapping[bytes, AveragingAnnouncement],
    round_: int,
    min_size: int,
    max_size: int,
    banned: Collection[bytes] = frozenset(),
    *,
    run: bytes,
    now: float,
    block_size: int = DEFAULT_BLOCK_SIZE,
    min_bandwidth_fraction: float = DEFAULT_MIN_BANDWIDTH_FRACTION,
    max_weight: float = DEFAULT_MAX_WEIGHT,
) -> Formation:
    """Form round ``round_``'s groups from ``announcements`` (publisher peer id -> verified
    announcement), deterministically: every peer that sees the same announcements, bans and
    ``now`` (Unix seconds, for expiry) gets the same groups, whatever the mapping's order.

    A peer is rejected when banned, when its id is malformed, or when its announcement is for
    another run or round or has expired. Members' ``weight`` is the announced weight clipped
    by ``bounded_weights`` (``max_weight`` and twice the median of the eligible announcements);
    their ``bandwidth`` is the announced ``bandwidth_mbps`` clipped to their group's median
    (``bounded_bandwidths``).

    Raises ``ValueError`` when ``min_size``/``max_size`` are not ``1 <= min <= max <=
    MAX_GROUP_SIZE``.
    """
    if not 1 <= min_size <= max_size <= MAX_GROUP_SIZE:
        raise ValueError(f"need 1 <= min_size <= max_size <= {MAX_GROUP_SIZE}")
    check_run(run, "form_groups")
    check_round(round_, "form_groups")
    banned_set = frozenset(banned)
    now_ms = now * 1000.0
    if not (math.isfinite(max_weight) and max_weight > 0.0):
        raise ValueError(f"max_weight must be finite and > 0, got {max_weight!r}")
    valid: dict[bytes, AveragingAnnouncement] = {}
    rejected: list[tuple[bytes, str]] = []
    for peer_id in sorted(announcements):
        ann = announcements[peer_id]
        reason = _ineligible(peer_id, ann, banned_set, run, round_, now_ms)
        if reason is not None:
            rejected.append((peer_id, reason))
            continue
        valid[peer_id] = ann
    weights = bounded_weights({p: a.weight for p, a in valid.items()}, max_weight)
    eligible: list[tuple[bytes, Member]] = []
    for peer_id, ann in valid.items():
        member = Member(peer_id, weights[peer_id], ann.bandwidth_mbps, ann.accepts_connections)
        eligible.append((order_key(run, round_, peer_id), member))
    eligible.sort(key=lambda pair: pair[0])
    ordered = [m for _, m in eligible]
    groups = []
    at = 0
    for size in group_sizes(len(ordered), min_size, max_size):
        groups.append(
            GroupSpec.of(
                run,
                round_,
                bounded_bandwidths(ordered[at : at + size]),
                block_size=block_size,
                min_bandwidth_fraction=min_bandwidth_fraction,
            )
        )
        at += size
    ungrouped = tuple(m.peer_id for m in ordered[at:])
    overclaimed = tuple(p for p, a in valid.items() if a.weight > max_weight)
    return Formation(tuple(groups), ungrouped, tuple(rejected), overclaimed)


def _ineligible(
    peer_id: bytes,
    ann: AveragingAnnouncement,
    banned: frozenset[bytes],
    run: bytes,
    round_: int,
    now_ms: float,
) -> str | None:
    if peer_id in banned:
        return "banned"
    if not isinstance(ann, AveragingAnnouncement):
        return "not an averaging announcement"
    if not MIN_PEER_ID_SIZE <= len(peer_id) <= MAX_PEER_ID_SIZE:
        return "malformed peer id"
    if ann.run != run:
        return "another run"
    if ann.round != round_:
        return "another round"
    if ann.expires_at_ms <= now_ms:
        return "expired"
    # The message's own rules already hold (it was decoded or constructed), but a value
    # built with object.__setattr__ or from a foreign decoder gets the same checks here.
    if not (math.isfinite(ann.weight) and ann.weight > 0.0):
        return "invalid weight"
    if not (math.isfinite(ann.bandwidth_mbps) and ann.bandwidth_mbps >= 0.0):
        return "invalid bandwidth"
    return None
