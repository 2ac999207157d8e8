"""The averager: matchmaking, channels and the all-reduce state machine, run over the network.

``await averager.all_reduce(buffer, weight, round_)`` announces this peer for the round, forms
a group with the others through the DHT, opens one data-plane channel per pair of members
(the peer with the smaller id opens it), leaves out of the round the members it cannot reach
and those that failed it in the previous round (``GroupSpec.without``: the layout and group id
change with them), seats the rest at tables of at most ``max_group`` (``GroupSpec.seat``),
and drives ``AllReducePeer`` with the frames that arrive, the peers that
fail, and the clock. The buffer is averaged in place; the returned
``RoundReport`` says exactly what was averaged.

The averager takes the node's parts it uses as the narrow interfaces of ``ports`` (a signer,
the DHT's record store, the links to peers, the score book, the data plane), never the swarm
node itself; constructing it does no I/O.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np
import trio
from libp2p.peer.id import ID

from dandelion_p2p.averaging.accepted_channels import AcceptedChannels
from dandelion_p2p.averaging.allreduce import AllReducePeer
from dandelion_p2p.averaging.compression import BufferErrorFeedback, get_codec
from dandelion_p2p.averaging.group import GroupSpec
from dandelion_p2p.averaging.kept_channels import PURPOSE_KEPT, PURPOSE_ONE_ROUND
from dandelion_p2p.averaging.matchmaking import Matchmaker, MatchmakingSettings
from dandelion_p2p.averaging.member_links import MemberLinks, Round
from dandelion_p2p.averaging.messages import (
    MAX_LISTED_BANS,
    AveragingAnnouncement,
)
from dandelion_p2p.averaging.ports import (
    ChannelOpener,
    PeerLinks,
    PeerReputation,
    RecordStore,
    Signer,
)
from dandelion_p2p.averaging.proofs import ProofExchange
from dandelion_p2p.averaging.report import ExclusionReason, RoundReport
from dandelion_p2p.errors import DandelionError
from dandelion_p2p.reputation.book import ScoreEvent
from dandelion_p2p.runconfig.schema import DEFAULT_CHUNK_TIMEOUT

log = logging.getLogger(__name__)

_NOT_A_FAILURE = frozenset({ExclusionReason.BANNED, ExclusionReason.GROUP_MISMATCH})
TICK = 0.5
END_GRACE = 0.5
"""Seconds a round's end waits for its writers to the members it gave up on (their queues are
closed, so what is left is our ChannelIdle) before it cuts off those still writing."""
MIN_PROOF_READ_GAP = 1.0
"""Seconds at least between two background reads of the run's proofs, whatever the interval."""
PROOF_READ_AFTER_ROUND = 2.0
"""Seconds after a round that the proofs are read again, when rounds come at least
``fetch_interval`` apart: the members of other groups publish theirs as their round ends."""
CHUNKS_PER_SPAN = 8
MIN_CHUNK = 64 * 1024


def chunk_elements(n_elements: int, members: int, most: int) -> int:
    """Chunk size for a round: small enough to pipeline, never above ``most``."""
    wanted = n_elements // max(1, members * CHUNKS_PER_SPAN)
    return max(min(wanted - wanted % 256, most), min(MIN_CHUNK, most))


class NoGroup(DandelionError):
    """Too few peers were ready for the round to form a group with this one, or (``late``) the
    group it forms has already finished the round without it, or a peer with nothing to add
    came after others had announced the round."""

    def __init__(self, message: str, *, late: int = 0) -> None:
        super().__init__(message)
        self.late = late
        """Members of this peer's group that finished the round before it came."""


@dataclass(frozen=True)
class AveragingSettings:
    codec: str = "none"
    mode: Literal["mean", "centered_clip"] = "mean"
    max_chunk: int = 1 << 20
    """Most elements per chunk frame (4 MiB of float32); spans are cut into at least
    ``CHUNKS_PER_SPAN`` chunks when that leaves them above ``MIN_CHUNK``, so that a reducer's
    results start flowing back while the rest of its span still arrives."""
    chunk_timeout: float = DEFAULT_CHUNK_TIMEOUT
    """A peer silent this long (no valid chunk or result) is cut off."""
    open_timeout: float = 10.0
    failure_memory_rounds: int = 1
    """A member that failed this peer (timed out, dropped its link, broke the protocol) is
    left out of the spans of this many following rounds of this averager."""
    bandwidth_mbps: float = 100.0
    matchmaking: MatchmakingSettings = field(default_factory=MatchmakingSettings)


class Averager:
    """This peer's averaging rounds of run ``run``.

    ``signer`` signs chunks and results as this peer; ``records`` holds the round
    announcements; ``links`` connects to the other members; ``reputation`` holds this node's
    bans and takes each round's score events; ``dataplane`` carries the frames; the
    "finished" announcement of a round is republished in ``background`` when given, and
    the channels this peer opens are kept there between rounds (``kept_channels``). A
    ``SwarmNode`` satisfies ``links`` and ``reputation``, its ``identity`` ``signer`` and its
    ``records`` ``records``.
    """

    def __init__(
        self,
        *,
        signer: Signer,
        records: RecordStore,
        links: PeerLinks,
        reputation: PeerReputation,
        dataplane: ChannelOpener,
        background: trio.Nursery | None = None,
        run: bytes,
        settings: AveragingSettings | None = None,
    ) -> None:
        self.signer = signer
        self.links = links
        self.reputation = reputation
        self.dataplane = dataplane
        self.background = background
        self.run = run
        self.settings = settings or AveragingSettings()
        self.me = signer.peer_id_bytes
        self.matchmaker = Matchmaker(records, settings=self.settings.matchmaking)
        self.proofs = ProofExchange(
            records, reputation, run, dht_timeout=self.settings.matchmaking.dht_timeout
        )
        self._rounds: dict[int, Round] = {}
        self._round_ready: dict[int, trio.Event] = {}
        self._ended_through = -1
        """The latest round that ran here and ended (rounds run one at a time, in order)."""
        self._failed_in_round: dict[bytes, int] = {}
        """Members that failed this peer, with the last round they did."""
        self._installed = False
        self._proof_reading: trio.CancelScope | None = None
        """The background reads of the run's proofs, while installed with a nursery."""
        self._read_proofs_first = False
        """The next round reads the proofs before it announces (the first since install)."""
        self._round_ended = trio.Event()
        self.reports: list[RoundReport] = []
        self.member_links = MemberLinks(
            me=self.me, run=run, links=links, dataplane=dataplane, reputation=reputation,
            settings=self.settings, left=self._left_round, background=background,
        )
        self.accepted = AcceptedChannels(
            run=run, open_timeout=self.settings.open_timeout, round_for=self._round_for_hello,
            keeping=lambda: self.member_links.kept.keeping)

    @property
    def channels_reopened(self) -> int:
        """Channels lost mid-round and replaced by new ones (for logs and tests)."""
        return self.member_links.reopened

    def install(self) -> None:
        """Serve the channels other members open to this peer (``all_reduce`` calls it
        before it announces, so a caller need not). Idempotent.

        Raises:
            ValueError: another handler already serves the averaging purpose on this data
                plane (an averager of another run not uninstalled).
        """
        if not self._installed:
            self.dataplane.register(PURPOSE_KEPT, self.accepted.handle)
            self.dataplane.register(PURPOSE_ONE_ROUND, self.accepted.handle)
            self._installed = True
            self.member_links.kept.keeping = True
            self._read_proofs_first = True
            if self.background is not None:
                scope = trio.CancelScope()
                self.background.start_soon(self._read_proofs, scope)
                self._proof_reading = scope

    def uninstall(self) -> None:
        """Stop serving inbound averaging channels (rounds in progress keep theirs)."""
        if self._installed:
            self.dataplane.unregister(PURPOSE_KEPT)
            self.dataplane.unregister(PURPOSE_ONE_ROUND)
            self._installed = False
        if self._proof_reading is not None:
            self._proof_reading.cancel()
            self._proof_reading = None
        self.member_links.kept.close_all()
        self.accepted.close_all()

    async def _read_proofs(self, scope: trio.CancelScope) -> None:
        """Read the run's proofs every ``fetch_interval``, and ``PROOF_READ_AFTER_ROUND`` after
        each round when rounds come at least that far apart, as long as this averager is
        installed: a round after the first then waits for no read before it announces, and
        a proof published as a round ends bans its reducer before the next round forms."""
        with scope:
            while True:
                with trio.move_on_after(max(MIN_PROOF_READ_GAP, self.proofs.due_in())):
                    await self._round_ended.wait()
                    await trio.sleep(PROOF_READ_AFTER_ROUND)
                self._round_ended = trio.Event()
                try:
                    await self._read_proofs_now()
                except Exception:  # a background read must never take the node down with it
                    log.exception("reading the run's equivocation proofs failed")

    async def _read_proofs_now(self) -> None:
        """Read the run's proofs, unless a read began less than ``MIN_PROOF_READ_GAP`` ago."""
        if self.proofs.age() >= MIN_PROOF_READ_GAP:
            await self.proofs.fetch(force=True)

    def _announce_finished(self, announcement: AveragingAnnouncement) -> None:
        """Tell peers still to come that this round is over here (in the background: the
        caller has its result and must not wait for the DHT)."""

        async def republish() -> None:
            try:
                await self.matchmaker.announce(dataclasses.replace(announcement, finished=True))
            except DandelionError as exc:
                log.debug("round %d: finished not announced: %s", announcement.round, exc)

        if self.background is not None:
            self.background.start_soon(republish)
            # While the worker computes the next round's contribution, the DHT servers of
            # that round's key are found (and of the one after, when rounds come back to
            # back): its announcement then stores at once. (Found during this round's
            # all-reduce instead, the lookup slows the all-reduce by about what it saves the
            # announcement on a busy CPU.)
            self.background.start_soon(self.matchmaker.prepare_after, self.run,
                                       announcement.round)

    async def _publish_proofs(self, report: RoundReport) -> None:
        """Put this peer's share of the round's equivocation proofs in the DHT, so that peers
        outside the group ban the reducer too (in the background when the node has one)."""

        async def publish() -> None:
            await self.proofs.publish(report.equivocation_proofs, report.members, self.me)

        if self.background is not None:
            self.background.start_soon(publish)
        else:
            await publish()

    def _banned_now(self) -> list[bytes]:
        """Peers this node has banned, worst score first, as many as an announcement lists."""
        now, book = time.time(), self.reputation.scores
        standings = sorted(
            (s for s in book.snapshot(now) if book.is_banned(s.peer_id, now)),
            key=lambda s: s.score,
        )
        return [s.peer_id for s in standings[:MAX_LISTED_BANS]]

    def _track_recorded(self) -> frozenset[bytes]:
        """Peers whose past rounds left them a positive score in our book: the only ones whose
        ban votes count (a fresh identity costs nothing, so its vote is worth nothing)."""
        now = time.time()
        return frozenset(s.peer_id for s in self.reputation.scores.snapshot(now) if s.score > 0)

    async def _round_for_hello(self, round_: int) -> Round | None:
        """The round a channel's hello names, once matched here (``AcceptedChannels``)."""
        if round_ <= self._ended_through and round_ not in self._rounds:
            # That round is over here. Saying so at once tells the opener (a member that
            # lost its channel to us and opens a new one), where waiting for the round to
            # start would hold it until its result timeout.
            return None
        ready = self._round_ready.setdefault(round_, trio.Event())
        with trio.move_on_after(self.settings.matchmaking.gather_window * 4 + 10):
            await ready.wait()
        return self._rounds.get(round_)

    def error_feedback_for(self, size: int) -> BufferErrorFeedback:
        """Error feedback for a vector of ``size`` elements under this averager's codec."""
        return BufferErrorFeedback(get_codec(self.settings.codec), size)

    def bytes_moved(self, round_: int) -> tuple[int, int] | None:
        """(sent, received) so far by the round in progress, or None when it is not running."""
        rnd = self._rounds.get(round_)
        return None if rnd is None or not rnd.ready.is_set() else rnd.state.bytes_moved

    async def all_reduce(
        self,
        buffer: np.ndarray,
        weight: float,
        round_: int,
        *,
        error_feedback: BufferErrorFeedback | None = None,
        reduces: bool = True,
    ) -> RoundReport:
        """Average ``buffer`` (1-D float32, C-contiguous) in place with this round's group.

        ``reduces=False`` announces no bandwidth, so that this peer reduces no span: a peer
        with nothing to add (a joiner taking the swarm's result) only sends and receives. It
        does not announce once two or more others have announced the round and do not expect
        it (``NoGroup`` with ``late``): they might read its announcement differently.

        For a gradient-like vector averaged every round with a lossy codec, pass the same
        ``error_feedback`` (made with ``error_feedback_for``) each round: what compression
        dropped from this peer's chunks is added to the next round's.

        Raises:
            NoGroup: fewer than the minimum group size were ready for this round.
            ValueError: ``buffer`` is not a 1-D C-contiguous float32 array, or another
                handler serves the averaging purpose (see ``install``).
        """
        if buffer.dtype != np.float32 or buffer.ndim != 1 or not buffer.flags.c_contiguous:
            raise ValueError("all_reduce needs a 1-D C-contiguous float32 buffer")
        self.install()
        s = self.settings
        if not reduces:
            # With nothing to add, coming once others have announced the round risks being
            # read by some members and not by others, whose groups would then differ and
            # lose the round: such a peer takes part in a later round instead. Not when one
            # peer alone announced (there is nobody to split from), nor when the others
            # expect it (it announced the round before): they wait for it.
            present = await self.matchmaker.read(self.run, round_)
            early = [p for p, a in present.items() if p != self.me and not a.leaving]
            if len(early) > 1 and self.me not in await self.matchmaker.expected_in(
                    self.run, round_):
                raise NoGroup(f"round {round_}: {len(early)} peers announced it before this "
                              "peer, which has nothing to add and is not expected: it waits "
                              "for a later round", late=len(early))
        # Proofs other peers published ban their reducers before this round's announcement
        # lists our bans and before the group is formed: read here before the first round
        # since install, later in the background (``_read_proofs``). Meanwhile the DHT
        # servers of the round's key are found, unless a round before did it (a first
        # round's announcement then comes as soon after the others' as it can).
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.matchmaker.prepare_unless_done, self.run, round_)
            if self._proof_reading is None:
                await self.proofs.fetch()
            elif self._read_proofs_first:
                await self._read_proofs_now()
                self._read_proofs_first = False
        announcement = AveragingAnnouncement(
            run=self.run,
            round=round_,
            weight=float(weight),
            bandwidth_mbps=s.bandwidth_mbps if reduces else 0.0,
            accepts_connections=self.links.reachable,
            endpoint=self.dataplane.endpoint or "",
            expires_at_ms=int((time.time() + self.matchmaker.next_ttl()) * 1000),
            banned=tuple(self._banned_now()),
        )
        track_recorded = self._track_recorded()
        # A round run again (its worker resumed from an older checkpoint) takes channels.
        self._ended_through = min(self._ended_through, round_ - 1)
        # Without a round matched here just before, finding whom to expect takes a DHT read:
        # done once the announcement is out, which the others wait for.
        expected = (await self._expected(round_) if self.matchmaker.knows_expected(round_)
                    else partial(self._expected, round_))
        spec, formation, finished = await self.matchmaker.match(
            self.me, announcement, track_recorded, expected=expected
        )
        for liar in formation.overclaimed:
            if liar != self.me and spec is not None and liar in spec:
                self.reputation.record_score(liar, ScoreEvent.MALFORMED)
        if spec is None:
            raise NoGroup(
                f"round {round_}: {len(formation.ungrouped)} peers without a group, "
                f"{len(formation.groups)} groups formed"
            )
        gone = finished & set(spec.peer_ids)
        others = set(spec.peer_ids) - {self.me}
        if gone and (gone >= others or gone & track_recorded):
            # Waiting for their chunks would only run into the chunk timeout. "Finished" is a
            # claim: it says this peer is behind only when every other member makes it, or a
            # member whose rounds verified with us does; a fresh key's claim alone just
            # leaves it out of the spans below.
            raise NoGroup(
                f"round {round_}: {len(gone)} of {len(spec.members) - 1} peers of this group "
                "finished the round before this peer came",
                late=len(gone),
            )

        def start_state(unreachable: set[bytes]) -> AllReducePeer:
            left_out = unreachable | gone
            # Members that reduce no span (a joiner with nothing to add) leave every layout
            # as it is: narrowing the group for one this peer cannot reach would change the
            # group's id and split this peer from the members that reach it. They are cut
            # off here alone, and only while unreachable (a failure remembered does not
            # change the spans).
            listeners = {p for p in spec.peer_ids if p != self.me
                         and spec.member(p).bandwidth == 0.0}
            remembered = self._failed_recently(round_, spec) - listeners
            if set(spec.peer_ids) - left_out - remembered != {self.me}:
                # Members that failed us lately are left out of a group that goes on
                # without them. Left alone by it, this peer would gain nothing, and a member
                # that does not know it failed us would wait the round out for us, fail us
                # in turn, and the two would take turns leaving each other out for good.
                left_out |= remembered
            cut_off = left_out & listeners
            kept = spec.without(left_out - cut_off).seat(self.me, s.matchmaking.max_group)
            if cut_off & set(kept.partition(buffer.size).reducers):
                # Without the others they would reduce after all (no member left announced
                # a bandwidth): a layout of their own, then.
                cut_off = set()
                kept = spec.without(left_out).seat(self.me, s.matchmaking.max_group)
            if kept is not spec:
                log.info("round %d: %d members left out of the spans: %s", round_,
                         len(kept.excluded), sorted(ID(p).to_base58() for p in kept.excluded))
            if cut_off:
                log.info("round %d: no channel to %d members that reduce nothing: %s",
                         round_, len(cut_off), sorted(ID(p).to_base58() for p in cut_off))
            state = AllReducePeer(
                peer_id=self.me,
                sign=self.signer.sign,
                spec=kept,
                buffer=buffer,
                # The group may have clipped our claim (run cap, median bound): sign that.
                weight=spec.member(self.me).weight,
                codec=s.codec,
                max_chunk=chunk_elements(buffer.size, len(kept.members), s.max_chunk),
                mode=s.mode,
                chunk_timeout=s.chunk_timeout,
                error_feedback=error_feedback,
            )
            for peer in cut_off & set(kept.peer_ids):
                state.leave_out(peer, trio.current_time(), ExclusionReason.FAILED,
                                "no channel when the round began")
            for peer in kept.peer_ids:
                if peer != self.me and self.reputation.scores.is_banned(peer, time.time()):
                    state.leave_out(peer, trio.current_time(), ExclusionReason.BANNED,
                                    "banned by this peer")
            return state

        rnd = Round(spec, self.me)
        rnd.skip(gone)
        self.member_links.kept.keep_only(set(spec.peer_ids))
        self._rounds[round_] = rnd
        self._round_ready.setdefault(round_, trio.Event()).set()
        try:
            await self._drive(rnd, round_, start_state)
        finally:
            rnd.finished.set()
            self._rounds.pop(round_, None)
            # With it go the events of earlier rounds that hellos asked for and that never
            # ran here: their waiters time out on their own.
            for r in [r for r in self._round_ready if r <= round_ and r not in self._rounds]:
                del self._round_ready[r]
            self._ended_through = max(self._ended_through, round_)
        self._announce_finished(announcement)
        pace = self.matchmaker.interval
        if pace is None or pace >= self.proofs.fetch_interval:
            self._round_ended.set()  # the background reads the proofs again shortly
        state = rnd.state
        report = state.report()
        self._remember_failures(round_, report)
        for peer, event in state.score_events:
            self.reputation.record_score(peer, event)
        self.reports.append(report)
        if report.equivocation_proofs:
            await self._publish_proofs(report)
        log.info(
            "round %d: %.1f%% averaged with %d members%s",
            round_,
            100 * report.fraction_averaged,
            len(report.members),
            "" if report.complete else f", excluded {len(report.excluded)}",
        )
        return report

    async def _left_round(self, round_: int, peer: bytes) -> bool:
        announcement = (await self.matchmaker.read(self.run, round_)).get(peer)
        return announcement is not None and announcement.leaving

    async def _expected(self, round_: int) -> set[bytes]:
        """Who matchmaking waits for: the peers whose announcements for the previous round
        this peer read when it formed that round, but those it bans, and those that failed
        it lately and are no longer connected (a peer that died mid-round). Every member
        read about the same announcements, so they wait for about the same peers and form
        the same groups; a newcomer read before the stop is waited for from the next round
        on. A peer that failed it but is still connected is waited for: a round that failed
        as a whole (a member died in it) leaves its survivors remembering each other's
        failures, often on one side only, and the side that expected nobody would wait the
        whole window while the other formed at once, failing every round after.

        After a gap (a joiner's first rounds, a restart, a round this peer missed) it read
        nothing for the previous round: the previous round's announcements in the DHT stand
        for what the others read. Waiting the whole window instead would have the others,
        who end gathering once their expected peers are in, finish the round without it.
        With no previous round anywhere (the swarm's first), the whole window is waited."""
        announcers = await self.matchmaker.expected_in(self.run, round_)
        now = time.time()
        return {
            p for p in announcers - {self.me}
            if not self.reputation.scores.is_banned(p, now)
            and (p not in self._failed_in_round or self.links.is_connected(ID(p)))
        }

    def _failed_recently(self, round_: int, spec: GroupSpec) -> set[bytes]:
        """Members of ``spec`` that failed this peer in the last ``failure_memory_rounds``
        rounds: every member that averaged with them saw the same failure, so all leave them
        out alike and the group keeps one layout."""
        memory = self.settings.failure_memory_rounds
        return {
            p for p in spec.peer_ids
            if p in self._failed_in_round and 0 < round_ - self._failed_in_round[p] <= memory
        }

    def _remember_failures(self, round_: int, report: RoundReport) -> None:
        # A peer that only saw another layout (or that we banned) did not fail the round.
        for peer, reasons in report.excluded_peers().items():
            if any(r not in _NOT_A_FAILURE for r in reasons):
                self._failed_in_round[peer] = round_
        for peer, last in list(self._failed_in_round.items()):
            if round_ - last > self.settings.failure_memory_rounds:
                del self._failed_in_round[peer]

    async def _settle_links(self, rnd: Round) -> None:
        """Wait until every member's channel is open or given up, at most the connect
        bound: members slower than that cannot keep the round's chunk timeout anyway."""
        s = self.settings
        with trio.move_on_after(min(s.open_timeout, s.chunk_timeout)):
            while not rnd.links_settled:
                rnd.changed = trio.Event()
                await rnd.changed.wait()

    async def announce_leaving(self, rounds: tuple[int, ...]) -> None:
        """This peer stops: it will not come to ``rounds`` (``Matchmaker.announce_leaving``)."""
        await self.matchmaker.announce_leaving(self.run, rounds)

    async def _drive(
        self,
        rnd: Round,
        round_: int,
        start_state: Callable[[set[bytes]], AllReducePeer],
    ) -> None:
        try:
            await self._drive_links(rnd, round_, start_state)
        except ExceptionGroup as group:
            # The round's own mistake (``all_reduce``'s documented ValueError: the buffer
            # went away with its worker, say) raised inside the nursery: raised as itself.
            mistakes, rest = group.split(ValueError)
            if mistakes is not None and rest is None:
                raise _first_leaf(mistakes) from None
            raise

    async def _drive_links(
        self,
        rnd: Round,
        round_: int,
        start_state: Callable[[set[bytes]], AllReducePeer],
    ) -> None:
        async with trio.open_nursery() as nursery:
            for peer in rnd.outboxes.keys() - rnd.unreachable:
                nursery.start_soon(self.member_links.link, rnd, round_, peer)
            await self._settle_links(rnd)
            state = start_state(set(rnd.outboxes) - rnd.connected)
            rnd.begin(state)
            rnd.dispatch(state.start(trio.current_time()))
            while not state.done:
                rnd.changed = trio.Event()
                # Wake at the state machine's next deadline, and at least every TICK: the
                # timeouts are its business, a bounded wait only makes sure they are looked at.
                deadline = min(state.next_deadline or math.inf, trio.current_time() + TICK)
                with trio.move_on_at(deadline):
                    await rnd.changed.wait()
                rnd.dispatch(state.tick(trio.current_time()))
            # Everything this peer owes the others is queued: let the writers drain it to the
            # members that are connected and still part of the round; nobody waits on a peer
            # that was cut off or never connected.
            for box in rnd.outboxes.values():
                box.close()
            excluded = state.report().excluded_peers()
            # A member that ended its round is owed only our ChannelIdle, excluded or not.
            waited = set(state.spec.peer_ids) - excluded.keys() | rnd.rested
            with trio.move_on_after(self.settings.chunk_timeout):
                await rnd.until_written(waited)
            # The members given up on: a moment to end on their channels in order too (a
            # ChannelIdle), where a cut-off would have them wait for a new channel.
            with trio.move_on_after(END_GRACE):
                await rnd.until_written(set(rnd.outboxes))
            # A frame being written is shielded from cancellation (a half-written frame would
            # break the stream); to a stalled peer it would never finish: cut those off.
            for peer in rnd.writing:
                channel = rnd.channels.get(peer)
                if channel is not None:
                    channel.abort()
            nursery.cancel_scope.cancel()


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
