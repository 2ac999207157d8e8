"""Matchmaking that ends when it can: once the peers of the last round are all back (and no
newcomer is still arriving), a round starts without waiting out the gathering window; a
straggler among them costs at most the window; a first round waits the window."""

from __future__ import annotations

import time

import numpy as np
import pytest
import trio

from dandelion_p2p.averaging import matchmaking
from dandelion_p2p.averaging.averager import AveragingSettings
from dandelion_p2p.averaging.matchmaking import (
    AVERAGING_NAMESPACE,
    Matchmaker,
    MatchmakingSettings,
    round_key,
)
from dandelion_p2p.averaging.messages import AveragingAnnouncement, encode_announcement
from dandelion_p2p.averaging.report import RoundReport
from dandelion_p2p.identity import Identity
from dandelion_p2p.net.dht.records import routing_key, sign_record
from tests.averaging.test_averager import RUN, Member, averaging_swarm
from tests.averaging.test_averager_ports import FakeRecords

WINDOW = 4.0
SETTINGS = AveragingSettings(
    max_chunk=64 * 1024,
    chunk_timeout=5.0,
    matchmaking=MatchmakingSettings(gather_window=WINDOW, settle=0.3),
)


async def timed_round(
    members: list[Member], round_: int, delays: dict[int, float] | None = None
) -> tuple[list[RoundReport], list[float]]:
    """One round of every member (member i starting ``delays[i]`` s late); the reports and
    how long each member's ``all_reduce`` took from its own start."""
    rng = np.random.default_rng(round_)
    reports: list[RoundReport | None] = [None] * len(members)
    took = [0.0] * len(members)

    async def run(i: int) -> None:
        await trio.sleep((delays or {}).get(i, 0.0))
        buffer = rng.standard_normal(100_000).astype(np.float32)
        started = trio.current_time()
        reports[i] = await members[i].averager.all_reduce(buffer, 1.0, round_)
        took[i] = trio.current_time() - started

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(len(members)):
                nursery.start_soon(run, i)
    return [r for r in reports if r is not None], took


async def test_a_round_with_everyone_back_starts_without_waiting_the_window() -> None:
    async with averaging_swarm(4, SETTINGS) as members:
        first, first_took = await timed_round(members, 1)
        second, second_took = await timed_round(members, 2)
    print(f"4 peers, window {WINDOW} s: round 1 took {[round(t, 2) for t in first_took]} s "
          f"(no history: the whole window), round 2 {[round(t, 2) for t in second_took]} s")
    for reports in (first, second):
        assert len(reports) == 4
        assert all(r.complete and r.fraction_averaged == 1.0 for r in reports)
        assert all(len(r.members) == 4 for r in reports)
    assert min(first_took) >= WINDOW
    # Everyone came back: matchmaking ended long before the window did (the all-reduce
    # itself takes as long in both rounds).
    assert max(second_took) < min(first_took) - WINDOW / 2


async def test_a_straggler_of_the_last_round_is_waited_for_within_the_window() -> None:
    async with averaging_swarm(3, SETTINGS) as members:
        await timed_round(members, 1)
        late = 1.5
        reports, took = await timed_round(members, 2, delays={2: late})
    print(f"3 peers, one {late} s late in round 2: rounds took {[round(t, 2) for t in took]} s")
    # The others waited for it (it averaged with them) and not the whole window beyond it.
    assert len(reports) == 3 and all(len(r.members) == 3 for r in reports)
    assert all(r.fraction_averaged == 1.0 for r in reports)
    assert max(took[:2]) < late + WINDOW / 2


async def test_a_peer_new_to_the_swarm_ends_gathering_with_the_others() -> None:
    """A joiner read no previous round of its own: the previous round's announcements in
    the DHT tell it whom the others wait for, so it forms when they do instead of waiting
    the whole window while they average (and, with rounds shorter than the window, finish
    every round without it)."""
    async with averaging_swarm(3, SETTINGS) as members:
        await timed_round(members[:2], 1)
        reports, took = await timed_round(members, 2)
    print(f"2 peers and a joiner in round 2: rounds took {[round(t, 2) for t in took]} s")
    assert len(reports) == 3 and all(len(r.members) == 3 for r in reports)
    assert all(r.fraction_averaged == 1.0 for r in reports)
    assert max(took) < WINDOW / 2


async def test_after_a_round_nobody_announced_the_peers_of_the_last_one_are_expected() -> None:
    """Every peer skipped round 2 (a split round before it was applied by none, and each
    took the swarm's state anew): nobody announced it, so round 3 expects the announcers of
    round 1, the last it matched, instead of waiting the whole window."""
    async with averaging_swarm(3, SETTINGS) as members:
        await timed_round(members, 1)
        # A leaving announcement is all round 2 holds (a peer that stopped, and came back).
        await members[2].averager.matchmaker.announce_leaving(RUN, [2])
        reports, took = await timed_round(members, 3)
    print(f"3 peers, round 2 skipped by all: round 3 took {[round(t, 2) for t in took]} s")
    assert len(reports) == 3 and all(len(r.members) == 3 for r in reports)
    assert max(took) < WINDOW / 2


async def test_a_peer_gone_since_the_last_round_costs_at_most_the_window() -> None:
    async with averaging_swarm(3, SETTINGS) as members:
        await timed_round(members, 1)
        gone = members[2]
        await gone.node.host.close()
        reports, took = await timed_round(members[:2], 2)
    print(f"3 peers, one gone before round 2: the others took {[round(t, 2) for t in took]} s")
    # It announced last round, so it was waited for: the window, once.
    assert len(reports) == 2 and all(len(r.members) == 2 for r in reports)
    assert min(took) >= WINDOW and max(took) < WINDOW + 5.0


async def test_a_peer_that_announced_leaving_is_not_waited_for() -> None:
    """A stopping daemon announces that it leaves the next round: the peers that expected it
    form at once instead of waiting out the window for it."""
    async with averaging_swarm(3, SETTINGS) as members:
        await timed_round(members, 1)
        await members[2].averager.matchmaker.announce_leaving(RUN, [2])
        reports, took = await timed_round(members[:2], 2)
        # Nor is it expected in the round after.
        _, took_next = await timed_round(members[:2], 3)
    print(f"3 peers, one leaving before round 2: the others took {[round(t, 2) for t in took]} "
          f"s, then {[round(t, 2) for t in took_next]} s")
    assert len(reports) == 2 and all(len(r.members) == 2 for r in reports)
    assert all(r.fraction_averaged == 1.0 for r in reports)
    assert max(took) < WINDOW / 2 and max(took_next) < WINDOW / 2


def announcement_of(round_: int, endpoint: str) -> AveragingAnnouncement:
    return AveragingAnnouncement(
        run=RUN, round=round_, weight=1.0, bandwidth_mbps=100.0, accepts_connections=True,
        endpoint=endpoint, expires_at_ms=int((time.time() + 60) * 1000),
    )


def plant_fresh_announcer(members: list[Member], round_: int, i: int) -> bytes:
    """A fresh key's signed announcement, put straight into every honest node's record store
    (as if it came from as many networks as it likes)."""
    fresh = Identity.generate()
    ann = announcement_of(round_, f"10.9.{i // 250}.{i % 250}:4001")
    record = sign_record(fresh, AVERAGING_NAMESPACE, round_key(RUN, round_),
                         encode_announcement(ann), 1, ann.expires_at_ms)
    for m in members:
        assert m.node.dht is not None
        m.node.dht.store.put(record, int(time.time() * 1000))
    return fresh.peer_id_bytes


async def gather(members: list[Member], settings: MatchmakingSettings, round_: int,
                 delays: dict[int, float]) -> tuple[list[float], list[set[bytes]]]:
    """Every member matches ``round_`` expecting the others (as after a round together),
    member i ``delays[i]`` s late; how long each took from its own start, and who was in
    the formation each formed."""
    ids = [m.node.identity.peer_id_bytes for m in members]
    took = [0.0] * len(members)
    formed: list[set[bytes]] = [set() for _ in members]

    async def run(i: int) -> None:
        await trio.sleep(delays.get(i, 0.0))
        matchmaker = Matchmaker(members[i].node.records, settings=settings)
        started = trio.current_time()
        _group, formation, _finished = await matchmaker.match(
            ids[i], announcement_of(round_, f"127.0.0.1:{4000 + i}"), expected=set(ids))
        took[i] = trio.current_time() - started
        formed[i] = {p for g in formation.groups for p in g.peer_ids} | set(formation.ungrouped)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(len(members)):
                nursery.start_soon(run, i)
    return took, formed


async def test_fresh_announcers_cannot_end_gathering_before_an_expected_peer_came() -> None:
    """Twenty fresh keys have announced before anyone; an honest peer of the last round comes
    1 s late. The others wait for it: the fresh keys cannot make them form without it."""
    settings = MatchmakingSettings(gather_window=WINDOW, settle=0.3)
    async with averaging_swarm(3, SETTINGS) as members:
        honest = {m.node.identity.peer_id_bytes for m in members}
        for i in range(20):
            plant_fresh_announcer(members, 2, i)
        took, formed = await gather(members, settings, 2, {2: 1.0})
    print(f"20 fresh announcers, an expected peer 1 s late: gathering took "
          f"{[round(t, 2) for t in took]} s")
    assert all(honest <= f for f in formed), "the late expected peer was formed without"
    assert min(took[:2]) >= 1.0
    assert max(took[:2]) < 1.0 + WINDOW / 2


async def test_fresh_announcers_cannot_hold_gathering_open_beyond_the_window() -> None:
    """A new fresh key announces every 50 ms for longer than the window: "no new announcer
    for 0.1 s" never holds, and the window (plus one bounded DHT read) still ends the wait."""
    settings = MatchmakingSettings(gather_window=2.0, settle=0.3)
    async with averaging_swarm(3, SETTINGS) as members:
        honest = {m.node.identity.peer_id_bytes for m in members}
        planted = 0

        async def flood() -> None:
            nonlocal planted
            while True:
                plant_fresh_announcer(members, 2, planted)
                planted += 1
                await trio.sleep(0.05)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            took, formed = await gather(members, settings, 2, {})
            nursery.cancel_scope.cancel()
    print(f"a fresh announcer every 50 ms ({planted} in all), window 2 s: gathering took "
          f"{[round(t, 2) for t in took]} s")
    assert all(honest <= f for f in formed)
    assert min(took) >= settings.gather_window
    assert max(took) < settings.gather_window + settings.dht_timeout + 1.0


class CountingReads(Matchmaker):
    """Counts the looks at the round's announcements: in this node's own store (``held``)
    and through the DHT (``read``)."""

    looks = reads = 0
    not_a_server = False
    missing: bytes = b""
    """A publisher whose put missed this node's store."""

    def held(self, run: bytes, round_: int) -> dict[bytes, AveragingAnnouncement] | None:
        self.looks += 1
        found = None if self.not_a_server else super().held(run, round_)
        return None if found is None else {p: a for p, a in found.items() if p != self.missing}

    async def read(self, run: bytes, round_: int) -> dict[bytes, AveragingAnnouncement]:
        self.reads += 1
        return await super().read(run, round_)


async def reads_to_gather(
    fresh_announcers: int, *, servers: bool = True, missed_by_first: bool = False
) -> tuple[list[CountingReads], list[float], list[set[bytes]]]:
    """Three members of the last round match round 2 expecting each other, every one's
    announcement already in the DHT (and ``fresh_announcers`` fresh keys' too): each one's
    matchmaker (its looks and reads), how long its gathering took, and who it formed with.
    ``servers=False``: they are not servers of the round's key (they read the DHT);
    ``missed_by_first``: the third member's announcement is not in the first one's store."""
    settings = MatchmakingSettings(gather_window=WINDOW, settle=0.3)
    async with averaging_swarm(3, SETTINGS) as members:
        ids = [m.node.identity.peer_id_bytes for m in members]
        for i, m in enumerate(members):
            ann = announcement_of(2, f"127.0.0.1:{4000 + i}")
            record = sign_record(m.node.identity, AVERAGING_NAMESPACE, round_key(RUN, 2),
                                 encode_announcement(ann), 1, ann.expires_at_ms)
            for holder in members:
                assert holder.node.dht is not None
                holder.node.dht.store.put(record, int(time.time() * 1000))
        for i in range(fresh_announcers):
            plant_fresh_announcer(members, 2, i)
        matchmakers = [CountingReads(m.node.records, settings=settings) for m in members]
        if missed_by_first:
            matchmakers[0].missing = ids[2]
        took = [0.0] * 3
        formed: list[set[bytes]] = [set() for _ in members]

        async def run(i: int) -> None:
            matchmakers[i].not_a_server = not servers
            started = trio.current_time()
            _group, formation, _finished = await matchmakers[i].match(
                ids[i], announcement_of(2, f"127.0.0.1:{4000 + i}"), expected=set(ids))
            took[i] = trio.current_time() - started
            formed[i] = {p for g in formation.groups for p in g.peer_ids}

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(run, i)
    return matchmakers, took, formed


async def test_gathering_ends_once_every_expected_peer_is_in_the_servers_own_store() -> None:
    """Nobody but the expected peers announced: nothing is left to wait for once all of them
    are seen and the quiet period since this peer began to announce (which lets a newcomer
    that began with it in) is over. Every member is a server of the round's key: it looks in
    its own store and asks nobody."""
    found, took, formed = await reads_to_gather(fresh_announcers=0)
    print(f"every expected peer in the first look: {[m.looks for m in found]} looks, "
          f"{[round(t, 2) for t in took]} s")
    s = MatchmakingSettings()
    assert all(m.looks <= 2 + s.quiet / s.poll_interval for m in found)
    assert [m.reads for m in found] == [0, 0, 0]
    assert all(s.quiet <= t < WINDOW / 4 for t in took)
    assert all(len(f) == 3 for f in formed)


async def test_a_peer_that_is_no_server_of_the_round_key_reads_the_dht() -> None:
    found, _took, formed = await reads_to_gather(fresh_announcers=0, servers=False)
    s = MatchmakingSettings()
    assert all(1 <= m.reads <= 2 + s.quiet / s.poll_interval for m in found)
    assert all(len(f) == 3 for f in formed)


async def test_a_put_that_missed_this_server_is_read_from_the_others_soon_after() -> None:
    """The third member's announcement did not reach the first one's store (its put timed
    out there): the first one finds it through the other servers ``ASK_OTHERS_EVERY`` into
    its gathering, and forms the same group as the others."""
    found, took, formed = await reads_to_gather(fresh_announcers=0, missed_by_first=True)
    print(f"a put that missed a server: {[round(t, 2) for t in took]} s")
    assert found[0].reads == 1 and [m.reads for m in found[1:]] == [0, 0]
    assert matchmaking.ASK_OTHERS_EVERY <= took[0] < WINDOW / 4
    assert formed[0] == formed[1] == formed[2] and len(formed[0]) == 3


async def test_an_expected_peer_missing_from_this_servers_store_is_looked_for_at_the_end(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first member's store misses the third member's put (the key's servers were found
    before it was among them) and its gathering asks no other server in the window: before it
    forms without the third member, it looks at the other servers once, and forms the group
    the others formed. Forming without it would leave the others waiting for its channel."""
    monkeypatch.setattr(matchmaking, "ASK_OTHERS_EVERY", 2 * WINDOW)
    found, took, formed = await reads_to_gather(fresh_announcers=0, missed_by_first=True)
    assert found[0].reads == 1 and [m.reads for m in found[1:]] == [0, 0]
    assert took[0] >= WINDOW
    assert formed[0] == formed[1] == formed[2] and len(formed[0]) == 3


async def test_a_newcomer_in_the_read_holds_gathering_for_the_quiet_period() -> None:
    found, took, _formed = await reads_to_gather(fresh_announcers=1)
    print(f"a newcomer among them: {[m.looks for m in found]} looks, "
          f"{[round(t, 2) for t in took]} s")
    quiet = MatchmakingSettings().quiet
    assert all(m.looks >= 2 for m in found)
    assert all(t >= quiet for t in took)


async def test_after_a_round_the_next_rounds_dht_servers_are_found_ahead() -> None:
    """While the worker computes the next round's contribution, each averager finds the DHT
    servers of that round's key, so its announcement stores without a lookup first."""
    next_key = routing_key(AVERAGING_NAMESPACE, round_key(RUN, 2))
    async with averaging_swarm(3, SETTINGS) as members:
        await timed_round(members, 1)
        with trio.fail_after(10):
            for m in members:
                assert m.node.dht is not None
                while next_key not in m.node.dht._prepared:
                    await trio.sleep(0.02)
        reports, _ = await timed_round(members, 2)
    assert len(reports) == 3 and all(r.fraction_averaged == 1.0 for r in reports)


class SlowLookups(FakeRecords):
    """Lookups of a key's servers that take ``delay`` seconds, with when each began."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.began: list[float] = []

    async def prepare_put(self, namespace: str, key: bytes, *,
                          timeout: float | None = None) -> None:
        self.began.append(trio.current_time())
        await trio.sleep(self.delay)
        await super().prepare_put(namespace, key, timeout=timeout)


def _rounds_of(records: FakeRecords) -> list[int]:
    found = [int.from_bytes(key[-8:], "big") for _, key in records.prepared]
    records.prepared.clear()
    return found


async def test_a_round_that_waits_the_whole_window_finds_the_next_rounds_servers_meanwhile(
) -> None:
    """A first round waits its whole gathering window: the DHT servers of the two rounds
    after it are found then, before back-to-back rounds would wait for those lookups."""
    records = SlowLookups(delay=0.05)
    mm = Matchmaker(records=records, settings=MatchmakingSettings(gather_window=0.3))
    mm.next_ttl()
    started = trio.current_time()
    await mm.match(b"me", announcement_of(1, "127.0.0.1:4000"))
    assert trio.current_time() - started >= 0.3
    assert _rounds_of(records) == [2, 3]
    assert all(began < started + 0.3 for began in records.began)
    await mm.prepare_after(RUN, 1)
    assert _rounds_of(records) == []  # both found already


async def test_a_lookup_cut_off_at_the_windows_end_is_made_again_after_the_round() -> None:
    records = SlowLookups(delay=0.5)
    mm = Matchmaker(records=records,
                    settings=MatchmakingSettings(gather_window=0.2, settle=0.05))
    mm.next_ttl()
    started = trio.current_time()
    await mm.match(b"me", announcement_of(1, "127.0.0.1:4000"))
    assert trio.current_time() - started < 0.45  # the window did not wait for the lookup
    assert _rounds_of(records) == [] and len(records.began) == 1
    await mm.prepare_after(RUN, 1)
    assert _rounds_of(records) == [2, 3]


async def test_back_to_back_rounds_find_the_servers_of_the_round_after_next_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When rounds come back to back, the next announcement starts before a lookup begun at
    the end of a round would end: the key of the round after next is looked up then too, so
    each key is found a round ahead; so do rounds whose pace is not known yet (a first
    round). Slow rounds look up the next key only. A key is looked up again only once the
    servers found for it are too old to use (``PREPARED_FOR``)."""
    now = [1000.0]
    monkeypatch.setattr(matchmaking.time, "monotonic", lambda: now[0])
    records = FakeRecords()
    mm = Matchmaker(records=records, settings=MatchmakingSettings())
    mm.next_ttl()
    await mm.prepare_after(RUN, 1)
    assert _rounds_of(records) == [2, 3]  # no pace known yet
    for number, expected in ((2, [4]), (3, [5]), (4, [6])):
        now[0] += 1.5
        mm.next_ttl()
        await mm.prepare_after(RUN, number)
        assert _rounds_of(records) == expected, number
    now[0] += 30.0
    mm.next_ttl()
    await mm.prepare_after(RUN, 5)
    assert _rounds_of(records) == []  # 6 was found 30 s ago: still used
    now[0] += 30.0
    mm.next_ttl()
    await mm.prepare_after(RUN, 6)
    assert _rounds_of(records) == [7]
    now[0] += 60.0
    mm.next_ttl()
    await mm.prepare_after(RUN, 6)  # run again, slowly: 7 was found 60 s ago
    assert _rounds_of(records) == [7]
    # A worker resumed from an older checkpoint runs round 2 again.
    now[0] += 1.0
    mm.next_ttl()
    await mm.prepare_after(RUN, 2)
    assert _rounds_of(records) == [3, 4]


async def test_a_peer_that_failed_this_one_but_is_still_connected_is_waited_for() -> None:
    """A round that failed as a whole leaves its survivors remembering each other's failures,
    often on one side only. Member 0 remembers member 1 failing round 1; it still expects it
    (they are connected), so it forms with it at once instead of waiting the whole window
    while member 1, expecting member 0, forms and waits on it alone."""
    async with averaging_swarm(2, SETTINGS) as members:
        await timed_round(members, 1)
        members[0].averager._failed_in_round[members[1].node.identity.peer_id_bytes] = 1
        reports, took = await timed_round(members, 2)
    print(f"a failure one peer remembers: round 2 took {[round(t, 2) for t in took]} s")
    assert len(reports) == 2 and all(r.fraction_averaged == 1.0 for r in reports)
    assert max(took) < WINDOW / 2


async def test_a_peer_that_failed_this_one_and_is_gone_is_not_waited_for() -> None:
    async with averaging_swarm(3, SETTINGS) as members:
        await timed_round(members, 1)
        gone = members[2]
        for m in members[:2]:
            m.averager._failed_in_round[gone.node.identity.peer_id_bytes] = 1
        await gone.node.host.close()
        # (A host closed inside this process leaves its connections looking open to the
        # others; a dead process's socket closes, and they drop it.)
        for m in members[:2]:
            await m.node.host.disconnect(gone.node.host.get_id())
            assert not m.node.is_connected(gone.node.host.get_id())
        reports, took = await timed_round(members[:2], 2)
    print(f"a failed peer gone before round 2: the others took {[round(t, 2) for t in took]} s")
    assert len(reports) == 2 and all(r.fraction_averaged == 1.0 for r in reports)
    assert max(took) < WINDOW / 2


def test_fast_rounds_shorten_the_announcements_life(monkeypatch: pytest.MonkeyPatch) -> None:
    """At most 64 of a peer's announcements are alive at once, so that a DHT server's 256
    records per storing peer never refuse them; rounds slower than 120 / 64 s keep the full
    life, and none lives under 30 s."""
    now = [1000.0]
    monkeypatch.setattr(matchmaking.time, "monotonic", lambda: now[0])
    mm = Matchmaker(records=None, settings=MatchmakingSettings())  # type: ignore[arg-type]
    lives = []
    for gap in (0.0, 0.25, 0.75, 1.0, 10.0):
        now[0] += gap
        lives.append(mm.next_ttl())
    assert lives == [120.0, 30.0, 48.0, 64.0, 120.0]


async def test_an_announcement_of_a_fast_round_lives_for_64_rounds() -> None:
    # The first round waits the whole window; the next ones end early.
    async with averaging_swarm(2, SETTINGS) as members:
        started = []
        for round_ in (1, 2, 3):
            started.append(time.time())
            await timed_round(members, round_)
        lives = []
        for round_, began in zip((1, 3), (started[0], started[2]), strict=True):
            found = await members[0].averager.matchmaker.read(members[0].averager.run, round_)
            lives.append(found[members[0].averager.me].expires_at_ms / 1000 - began)
    gap = started[2] - started[1]
    expected = min(120.0, max(30.0, 64 * gap))
    assert abs(lives[0] - 120.0) < 1.0, lives
    assert expected - 1.0 <= lives[1] <= expected + 1.0, (lives, gap)
    print(f"round 3 began {gap:.2f} s after round 2: announced for {lives[1]:.1f} s")


async def test_a_flood_of_puts_under_the_round_key_buys_a_bounded_number_of_looks(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server of the round's key looks at its own store as each put lands there; anyone may
    put under that key, as fast as the wire allows. Puts sent without pause during a whole
    gathering (an expected peer never comes) buy at most one look per ``LOOK_GAP``."""
    gap = 0.05
    monkeypatch.setattr(matchmaking, "LOOK_GAP", gap)
    window = 1.5
    settings = MatchmakingSettings(gather_window=window, settle=0.3)
    async with averaging_swarm(4, SETTINGS) as members:
        *gatherers, flooder = members
        ids = [m.node.identity.peer_id_bytes for m in gatherers]
        never_comes = Identity.generate().peer_id_bytes
        matchmakers = [CountingReads(m.node.records, settings=settings) for m in gatherers]
        key = round_key(RUN, 2)
        value = encode_announcement(announcement_of(2, "127.0.0.1:4999"))
        puts = 0
        formed: list[set[bytes]] = [set() for _ in gatherers]

        async def flood() -> None:
            nonlocal puts
            while True:
                await flooder.node.records.put(AVERAGING_NAMESPACE, key, value, 60.0,
                                               keep=False, timeout=1.0)
                puts += 1

        async def run(i: int) -> None:
            _group, formation, _finished = await matchmakers[i].match(
                ids[i], announcement_of(2, f"127.0.0.1:{4000 + i}"),
                expected={*ids, never_comes})
            formed[i] = {p for g in formation.groups for p in g.peer_ids}

        with trio.fail_after(30):
            async with trio.open_nursery() as flooding:
                for _ in range(4):
                    flooding.start_soon(flood)
                await trio.sleep(0.2)
                async with trio.open_nursery() as nursery:
                    for i in range(len(gatherers)):
                        nursery.start_soon(run, i)
                flooding.cancel_scope.cancel()
    looks = [m.looks for m in matchmakers]
    print(f"{puts} puts while gathering for {window} s: {looks} looks")
    assert puts > 2 * window / gap, "the flood was no flood"
    # One look per gap, plus the first and the one the window's end makes.
    assert all(n <= window / gap + 3 for n in looks)
    assert all(f == formed[0] and set(ids) <= f for f in formed)
