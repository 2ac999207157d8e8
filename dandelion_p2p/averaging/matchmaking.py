"""Matchmaking through the DHT: announce readiness for a round, gather the others' signed
announcements, and form groups by the deterministic rule in ``group.py`` (no leader).

Announcements are DHT records under the ``avg`` namespace, keyed by (run, round), one per
publisher; the DHT verifies the publisher's signature on every record it stores or returns.
A training daemon's ``run`` is ``group_run_key(run id, config version, config text)``: peers
training under different versions of the run's config announce under different keys and
compute different group ids, so they never form a group together.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

import blake3
import msgpack
import trio

from dandelion_p2p.averaging.group import Formation, GroupSpec, consensus_bans, form_groups
from dandelion_p2p.averaging.messages import (
    MAX_GROUP_SIZE,
    AveragingAnnouncement,
    decode_announcement,
    encode_announcement,
)
from dandelion_p2p.errors import DandelionError, ProtocolViolation
from dandelion_p2p.net.dht.messages import SignedRecord
from dandelion_p2p.net.dht.records import NamespacePolicy, RecordValidator
from dandelion_p2p.net.ports import RecordStore
from dandelion_p2p.runconfig.schema import DEFAULT_GATHER_WINDOW, DEFAULT_MAX_WEIGHT

log = logging.getLogger(__name__)

AVERAGING_NAMESPACE = "avg"
MAX_ANNOUNCEMENT_TTL_MS = 600_000
GROUP_RUN_DOMAIN = b"dandelion/avg-run/v1"
LIVE_ANNOUNCEMENTS = 64
"""Most of one peer's round announcements alive at once, whatever the pace of its rounds:
a DHT server holds 256 records per storing peer (``StoreLimits``), and an announcement it
refuses is unseen by the peers that read the key from it."""
MIN_ANNOUNCEMENT_TTL = 30.0
ASK_OTHERS_EVERY = 0.5
"""Seconds between two reads of the other DHT servers by a server of the round's key that
watches its own store: a put that missed it, or a routing table that wrongly counts it among
the key's closest, costs at most this."""
LOOK_GAP = 0.01
"""Least seconds between two looks at this node's own store that puts landing there wake:
puts sent as fast as the wire allows (anyone may put under a round's key) buy at most one
look per gap, each decoding only the records it has not seen (``DECODED_KEPT``)."""
DECODED_KEPT = 4096
"""Announcements kept decoded (4 times the publishers one key holds)."""
TWO_AHEAD_BELOW = 20.0
"""Rounds closer together than this (seconds from one to the next) find the DHT servers of
the round after next, too: the next announcement comes before a lookup started when a round
ends would finish. A record store keeps what it found for a minute, which two such rounds
leave time for."""
PREPARED_FOR = 50.0
"""Seconds a lookup made ahead stands for its round's key; older, it is made again (the record
store uses the servers it found for 60 s)."""


def round_key(run: bytes, round_: int) -> bytes:
    return run + round_.to_bytes(8, "big")


def group_run_key(run: str, config_version: int, config_text: str = "") -> bytes:
    """What the peers of run ``run`` training under config version ``config_version`` (whose
    TOML is ``config_text``) average as (the ``run`` of their announcements, group specs and
    frames): 32 bytes, so any run id fits the averaging messages' bound. The text is part of
    it: should an owner ever sign two texts under one version number (two publishes racing
    from two machines), the peers holding each still never average together."""
    text_digest = blake3.blake3(config_text.encode()).digest()
    return blake3.blake3(
        msgpack.packb([GROUP_RUN_DOMAIN, run, config_version, text_digest], use_bin_type=True)
    ).digest()


def register_namespace(validator: RecordValidator) -> None:
    """The ``avg`` namespace, on every node: DHT servers hold the announcements of peers
    behind NAT whether or not they average themselves."""

    def check(value: bytes) -> None:
        decode_announcement(value)

    validator.register(
        AVERAGING_NAMESPACE, NamespacePolicy(max_ttl_ms=MAX_ANNOUNCEMENT_TTL_MS, check_value=check)
    )


@dataclass(frozen=True)
class MatchmakingSettings:
    gather_window: float = DEFAULT_GATHER_WINDOW
    """Seconds between announcing and reading the others' announcements."""
    settle: float = 0.5
    """A second read this long after the first catches announcements still propagating."""
    quiet: float = 0.1
    """With peers expected (``match(expected=)``): gathering ends once all of them have
    announced and no new announcer appeared for this long, the window being the bound; and
    no sooner than this long after this peer began to announce, which lets a newcomer that
    began with it in."""
    poll_interval: float = 0.05
    """How often a peer that is no server of the round's key reads the announcements (through
    the DHT) while expected peers are awaited; a server is woken by each put that lands in its
    own store instead."""
    end_early: bool = True
    """Off: every round waits the whole window, expected peers or not (the rule before
    gathering could end early; ``benchmarks/averaging_throughput.py --wait-window``)."""
    min_group: int = 2
    max_group: int = 16
    """Most members one table averages with (``GroupSpec.seat``)."""
    candidate_group: int = 64
    """Most announcers one group is formed with before the members that do not answer are
    left out and the rest seated at tables of at most ``max_group``: up to this many
    announcers that never connect cannot split the members that do. Each member opens a
    channel to every other member of its group, so this bounds channels per round too."""
    announcement_ttl: float = 120.0
    dht_timeout: float = 2.0
    """Bound on each DHT read or write, so a stalled peer cannot hold up matchmaking."""
    max_weight: float = DEFAULT_MAX_WEIGHT
    """Samples one member may claim for one round; a larger announcement is clipped."""
    admitted: frozenset[bytes] | None = None
    """A closed run's admitted peer ids (run config ``admission.peers``): announcements of
    anyone else are ignored, as if never published. None: an open run."""


class Matchmaker:
    def __init__(self, records: RecordStore, *, settings: MatchmakingSettings) -> None:
        self.records = records
        self.settings = settings
        self._announcers: tuple[int, frozenset[bytes]] = (-1, frozenset())
        """The last round matched, and who had announced for it when this peer formed."""
        self._announced_at: float | None = None
        self._interval: float | None = None
        """Seconds between the starts of this peer's last two rounds."""
        self._prepared: dict[int, float] = {}
        """Rounds whose key's DHT servers were looked up ahead (or are being), with when."""
        self._decoded = _Decoded()

    @property
    def interval(self) -> float | None:
        """Seconds between the starts of this peer's last two rounds (None before two)."""
        return self._interval

    def next_ttl(self) -> float:
        """Seconds the announcement of the round this peer starts now lives: the settings'
        ``announcement_ttl``, cut for rounds faster than one per ``announcement_ttl /
        LIVE_ANNOUNCEMENTS`` seconds to ``LIVE_ANNOUNCEMENTS`` times the time since its last
        round began (at least ``MIN_ANNOUNCEMENT_TTL``). A peer later than that many rounds
        finds no announcement saying the round is over, which costs it nothing more: the
        peers keep at most 64 rounds for it to replay (``checkpoint.keep_rounds``)."""
        now = time.monotonic()
        last, self._announced_at = self._announced_at, now
        ttl = self.settings.announcement_ttl
        if last is None:
            return ttl
        self._interval = now - last
        return min(ttl, max(MIN_ANNOUNCEMENT_TTL, LIVE_ANNOUNCEMENTS * self._interval))

    def announcers_of(self, round_: int) -> frozenset[bytes]:
        """The publishers this peer read for ``round_`` when it last matched it; empty when
        its last match was another round."""
        last, announcers = self._announcers
        return announcers if last == round_ else frozenset()

    def knows_expected(self, round_: int) -> bool:
        """Whether ``expected_in(round_)`` needs no DHT read: this peer matched the round
        before with others (or ``round_`` is the first)."""
        return round_ == 0 or bool(self.announcers_of(round_ - 1))

    async def expected_in(self, run: bytes, round_: int) -> frozenset[bytes]:
        """Who the others wait for in ``round_``: the announcers of the round before as this
        peer read them when it matched it; when it did not (a joiner, a restart, a round
        missed), that round's announcements in the DHT, which stand for what the others read;
        when nobody but leavers announced that round (every peer skipped it, as after a round
        applied by none), those of the last round this peer matched, read again. Peers that
        said they leave are not among them."""
        if self.knows_expected(round_):
            return self.announcers_of(round_ - 1)
        coming = _coming(await self.read(run, round_ - 1))
        last_matched = self._announcers[0]
        if not coming and 0 <= last_matched < round_ - 1:
            coming = _coming(await self.read(run, last_matched))
        return coming

    async def announce_leaving(self, run: bytes, rounds: Collection[int]) -> None:
        """Tell the peers that expect this one in ``rounds`` that it will not come: its
        announcement of each becomes a ``leaving`` one. Failures are logged, not raised (the
        others then wait for it up to the gathering window, as for any peer that is gone)."""
        expires = int((time.time() + self.settings.announcement_ttl) * 1000)
        for round_ in rounds:
            try:
                await self.announce(AveragingAnnouncement(
                    run=run, round=round_, weight=1.0, bandwidth_mbps=0.0,
                    accepts_connections=False, endpoint="", expires_at_ms=expires,
                    leaving=True))
            except DandelionError as exc:
                log.info("round %d: leaving not announced: %s", round_, exc)

    async def prepare_after(self, run: bytes, round_: int) -> None:
        """Once ``round_`` is over here, find the DHT servers of the next round's key; with
        rounds closer together than ``TWO_AHEAD_BELOW`` (or before their pace is known), of
        the round after it too, so that back-to-back rounds find each key a round ahead
        instead of waiting for the lookup. Each key is looked up once."""
        fast = self._interval is None or self._interval < TWO_AHEAD_BELOW
        for ahead in range(round_ + 1, round_ + (3 if fast else 2)):
            await self.prepare_unless_done(run, ahead)

    async def prepare_unless_done(self, run: bytes, round_: int) -> None:
        """``prepare(round_)`` unless a lookup of its key began less than ``PREPARED_FOR``
        ago (``prepare_after``); one cut short counts as not made."""
        now = time.monotonic()
        began = self._prepared.get(round_)
        if began is not None and now - began < PREPARED_FOR:
            return
        for stale in [r for r, at in self._prepared.items() if now - at >= PREPARED_FOR]:
            del self._prepared[stale]
        self._prepared[round_] = now
        try:
            await self.prepare(run, round_)
        except BaseException:
            if self._prepared.get(round_) == now:
                del self._prepared[round_]
            raise

    async def prepare(self, run: bytes, round_: int) -> None:
        """Find the DHT servers of ``round_``'s key ahead of its announcement, which then
        stores there at once (``RecordStore.prepare_put``). A failure is logged: the
        announcement then looks them up itself."""
        try:
            await self.records.prepare_put(AVERAGING_NAMESPACE, round_key(run, round_),
                                           timeout=self.settings.dht_timeout)
        except DandelionError as exc:
            log.debug("round %d: its DHT servers not found ahead: %s", round_, exc)

    async def announce(self, announcement: AveragingAnnouncement) -> int:
        key = round_key(announcement.run, announcement.round)
        ttl = max(1.0, announcement.expires_at_ms / 1000 - time.time())
        return await self.records.put(
            AVERAGING_NAMESPACE,
            key,
            encode_announcement(announcement),
            ttl,
            keep=False,
            timeout=self.settings.dht_timeout,
        )

    async def read(self, run: bytes, round_: int) -> dict[bytes, AveragingAnnouncement]:
        """Valid announcements for (run, round), by publisher."""
        try:
            records = await self.records.get(
                AVERAGING_NAMESPACE, round_key(run, round_), timeout=self.settings.dht_timeout
            )
        except DandelionError as exc:
            log.warning("reading announcements for round %d failed: %s", round_, exc)
            return {}
        return self._admitted(self._decoded.announcements(records, run, round_))

    def _admitted(
        self, found: dict[bytes, AveragingAnnouncement]
    ) -> dict[bytes, AveragingAnnouncement]:
        admitted = self.settings.admitted
        if admitted is None:
            return found
        return {peer: ann for peer, ann in found.items() if peer in admitted}

    def landing(self, run: bytes, round_: int) -> trio.Event:
        """Set when the next announcement for (run, round) lands in this node's own store."""
        return self.records.landing(AVERAGING_NAMESPACE, round_key(run, round_))

    def held(self, run: bytes, round_: int) -> dict[bytes, AveragingAnnouncement] | None:
        """The announcements for (run, round) in this node's own store when it is one of the
        round key's servers (``RecordStore.held``), else None."""
        records = self.records.held(AVERAGING_NAMESPACE, round_key(run, round_))
        if records is None:
            return None
        return self._admitted(self._decoded.announcements(records, run, round_))

    async def match(
        self,
        me: bytes,
        announcement: AveragingAnnouncement,
        track_recorded: Collection[bytes] | None = None,
        expected: Collection[bytes] | Callable[[], Awaitable[Collection[bytes]]] = (),
    ) -> tuple[GroupSpec | None, Formation, set[bytes]]:
        """Announce, gather the others' announcements, and form this round's groups.

        With ``expected`` peers (those that announced for the previous round), gathering
        ends as soon as all of them have announced and no newcomer appeared for ``quiet``
        seconds; a straggler among them costs at most the ``gather_window``. Without, the
        whole window is waited (a first round: nobody knows who is coming). ``expected``
        may be a coroutine function, awaited once the announcement is out: finding who is
        expected can take a DHT read (a joiner's), which then does not delay the
        announcement that the others wait for.

        Returns my group (None if I ended up without one), the whole formation, and the other
        announcers that have already finished the round. Finished announcers still count in
        the formation, so that every peer forms the same groups whenever it reads.
        Ban votes count only from ``track_recorded`` publishers (all when None), and never
        evict ``me``.
        """
        s = self.settings
        started = trio.current_time()
        await self.announce(announcement)
        if callable(expected):
            expected = await expected()
        wanted = set(expected) - {me} if s.end_early else set()
        if wanted:
            seen = await self._gather_expected(announcement, wanted, me, started)
        else:
            window_ends = trio.current_time() + s.gather_window
            # The window is waited whole: the next rounds' DHT servers are found meanwhile,
            # before the back-to-back rounds after it would wait for those lookups.
            with trio.move_on_at(window_ends):
                await self.prepare_after(announcement.run, announcement.round)
            await trio.sleep_until(window_ends)
            seen = await self.read(announcement.run, announcement.round)
            await trio.sleep(s.settle)
            seen.update(await self.read(announcement.run, announcement.round))
        seen[me] = announcement
        # A leaving peer has arrived as far as waiting goes (it said it will not come), and
        # is in no group, nor expected next round.
        seen = {peer: ann for peer, ann in seen.items() if not ann.leaving}
        self._announcers = (announcement.round, frozenset(seen) - {me})
        # The groups follow the bans a majority agrees on, never this peer's alone: every
        # member must form the same groups. Peers only we banned are cut off later, by us.
        banned = consensus_bans(seen, track_recorded, me=me)
        formation = form_groups(
            seen,
            announcement.round,
            s.min_group,
            min(MAX_GROUP_SIZE, max(s.max_group, s.candidate_group)),
            banned,
            run=announcement.run,
            now=time.time(),
            max_weight=s.max_weight,
        )
        group = formation.group_of(me)
        log.info(
            "round %d: %d announcements, %d groups, mine has %s members (matched in %.2f s, "
            "%s)",
            announcement.round,
            len(seen),
            len(formation.groups),
            len(group.members) if group else 0,
            trio.current_time() - started,
            f"{len(wanted)} expected" if wanted else "the whole window",
        )
        finished = {peer for peer, ann in seen.items() if ann.finished and peer != me}
        return group, formation, finished

    async def _gather_expected(
        self, announcement: AveragingAnnouncement, wanted: set[bytes], me: bytes,
        started: float
    ) -> dict[bytes, AveragingAnnouncement]:
        """Read until every ``wanted`` peer has announced and the set stayed the same for
        ``quiet`` seconds (and ``quiet`` has passed since ``started``, when this peer began
        to announce), or until the gathering window is over."""
        s = self.settings
        deadline = trio.current_time() + s.gather_window
        # A server of the round's key sees each put land in its own store: it polls that, and
        # asks the other servers now and then, for a put that missed it.
        ask_at = trio.current_time() + ASK_OTHERS_EVERY
        seen: dict[bytes, AveragingAnnouncement] = {}
        changed_at = started
        while True:
            found = self.held(announcement.run, announcement.round)
            # Taken with no checkpoint after the look: a put landing later wakes the wait
            # below. Only a server of the key is put to; any other peer polls.
            landing = None if found is None else self.landing(announcement.run,
                                                              announcement.round)
            asked_others = False
            if found is None or trio.current_time() >= ask_at:
                found = {**(found or {}), **await self.read(announcement.run, announcement.round)}
                ask_at = trio.current_time() + ASK_OTHERS_EVERY
                asked_others = True
            now = trio.current_time()
            if found.keys() - seen.keys() - wanted - {me}:
                changed_at = now
            seen.update(found)
            if wanted <= seen.keys() and now - changed_at >= s.quiet:
                break
            if now >= deadline:
                if not asked_others and not wanted <= seen.keys():
                    # This peer's own store missed the puts of those still awaited (their
                    # servers were found before it joined the key's closest): a last look
                    # at the other servers before the round goes on without them.
                    seen.update(await self.read(announcement.run, announcement.round))
                    if wanted <= seen.keys():
                        break
                log.info("round %d: %d of %d expected peers announced within the window",
                         announcement.round, len(wanted & seen.keys()), len(wanted))
                break
            if landing is not None:
                # Our own store: woken by each put that lands, else when the quiet period,
                # the next look at the other servers or the window is due.
                wake = min(deadline, ask_at)
                if wanted <= seen.keys():
                    wake = min(wake, changed_at + s.quiet)
                with trio.move_on_at(wake):
                    await landing.wait()
                    await trio.sleep_until(min(wake, now + LOOK_GAP))
            else:
                await trio.sleep(min(s.poll_interval, max(0.0, deadline - now)))
        return seen


def _coming(announcements: dict[bytes, AveragingAnnouncement]) -> frozenset[bytes]:
    """The publishers that did not say they leave."""
    return frozenset(peer for peer, ann in announcements.items() if not ann.leaving)


class _Decoded:
    """Announcements already decoded, by their record's value (what decoding reads, and all
    it reads): a gathering looks at the same records again and again, and decodes each once.
    Bounded by ``DECODED_KEPT``, forgotten whole when full."""

    def __init__(self) -> None:
        self._by_value: dict[bytes, AveragingAnnouncement | None] = {}

    def announcements(
        self, records: list[SignedRecord], run: bytes, round_: int
    ) -> dict[bytes, AveragingAnnouncement]:
        found: dict[bytes, AveragingAnnouncement] = {}
        for record in records:
            if record.value in self._by_value:
                ann = self._by_value[record.value]
            else:
                try:
                    ann = decode_announcement(record.value)
                except ProtocolViolation:
                    ann = None
                if len(self._by_value) >= DECODED_KEPT:
                    self._by_value.clear()
                self._by_value[record.value] = ann
            if ann is not None and ann.run == run and ann.round == round_:
                found[record.publisher] = ann
        return found
