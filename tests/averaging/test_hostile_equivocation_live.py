"""An equivocating reducer among real averagers on real loopback nodes.

One member's own framer sends one honest member a different result for its span, validly
signed (what a modified client does). Every honest member must catch it in that round, keep its
local values for that span and agree elsewhere; a peer that took no part must ban the reducer on
the proof a member publishes in the DHT; the next round must go on without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
import trio

from dandelion_p2p.averaging import sends
from dandelion_p2p.averaging.averager import AveragingSettings
from dandelion_p2p.averaging.matchmaking import MatchmakingSettings
from dandelion_p2p.averaging.messages import Buffer
from dandelion_p2p.averaging.partition import Chunk
from dandelion_p2p.averaging.report import ChunkStatus, ExclusionReason
from dandelion_p2p.reputation.book import ScoreEvent
from tests.averaging.test_averager import averaging_swarm, round_of

SIZE = 120_000
SHIFT = 3.0
SETTINGS = AveragingSettings(
    max_chunk=16 * 1024,
    chunk_timeout=5.0,
    matchmaking=MatchmakingSettings(gather_window=0.8, settle=0.3, min_group=2),
)


def equivocating_results(
    cheat: bytes, victim: bytes, sent: list[int]
) -> Callable[..., list[sends.Send]]:
    honest_results = sends.Framer.results

    def results(
        framer: sends.Framer,
        span_index: int,
        chunk: Chunk,
        contributors: tuple[bytes, ...],
        payload: Buffer,
        recipients: list[bytes],
    ) -> list[sends.Send]:
        if framer._peer_id != cheat or victim not in recipients:
            return honest_results(framer, span_index, chunk, contributors, payload, recipients)
        others = [p for p in recipients if p != victim]
        values = np.frombuffer(bytes(payload), dtype="<f4") + np.float32(SHIFT)
        sent.append(chunk.index)
        return [
            *honest_results(framer, span_index, chunk, contributors, payload, others),
            *honest_results(
                framer, span_index, chunk, contributors, values.astype("<f4").tobytes(), [victim]
            ),
        ]

    return results


async def test_live_equivocating_reducer_is_caught_in_the_round_and_banned_beyond_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    n = 4
    rng = np.random.default_rng(5)
    vectors = [rng.standard_normal(SIZE).astype(np.float32) for _ in range(n)]
    async with averaging_swarm(n + 1, SETTINGS) as nodes:
        members, outsider = nodes[:n], nodes[n]
        ids = [m.node.identity.peer_id_bytes for m in members]
        cheat, victim = ids[0], ids[1]
        tampered: list[int] = []
        monkeypatch.setattr(sends.Framer, "results", equivocating_results(cheat, victim, tampered))
        buffers = [v.copy() for v in vectors]
        reports = await round_of(members, buffers, 1)
        assert tampered, "the cheating reducer sent no result to its victim"

        honest = list(range(1, n))
        span = None
        for i in honest:
            report = reports[i]
            assert report is not None and set(report.members) == set(ids), report
            (span,) = [s for s in report.spans if s.reducer == cheat]
            reasons = report.excluded_peers().get(cheat, ())
            statuses = {c.status for c in span.chunks}
            assert ExclusionReason.EQUIVOCATION in reasons, (i, reasons)
            assert statuses == {ChunkStatus.LOCAL}, (i, statuses)
            assert report.equivocation_proofs and not report.complete
            np.testing.assert_array_equal(
                buffers[i][span.start : span.end], vectors[i][span.start : span.end]
            )
            assert members[i].node.scores.is_banned(cheat, time.time()), i
        assert span is not None
        outside = np.ones(SIZE, dtype=bool)
        outside[span.start : span.end] = False
        spread = max(
            float(np.max(np.abs(buffers[i][outside] - buffers[1][outside]))) for i in honest
        )
        honest_mean = np.mean([vectors[i] for i in range(n)], axis=0)
        off = float(
            np.linalg.norm(buffers[1][outside] - honest_mean[outside])
            / np.linalg.norm(honest_mean[outside])
        )
        assert spread == 0.0, f"honest members differ by {spread} outside the cheat's span"
        assert off < 1e-5, off

        # A peer that took no part reads a member's proof from the DHT and bans on it alone.
        banned: list[bytes] = []
        with trio.fail_after(30):
            while cheat not in banned:
                banned += await outsider.averager.proofs.fetch(force=True)
                await trio.sleep(0.2)
        assert outsider.node.scores.is_banned(cheat, time.time())
        standing = outsider.node.scores.standing(cheat, time.time())
        assert standing.events.get(ScoreEvent.EQUIVOCATION.value) == 1, standing.events

        # The next round: the honest members average without it, all of their vectors.
        monkeypatch.undo()
        start = [b.copy() for b in buffers]
        second = await round_of(members[1:], buffers[1:], 2)  # the cheat, members[0], is gone
        want = np.mean([start[i] for i in honest], axis=0)
        for i in honest:
            report = second[i - 1]
            assert report is not None and cheat not in report.members, report
            assert report.complete and report.fraction_averaged == 1.0, report.to_dict()
            np.testing.assert_allclose(buffers[i], want, rtol=1e-5, atol=1e-6)
    print(
        f"\n{n} real averagers, reducer of [{span.start}, {span.end}) sent +{SHIFT} on "
        f"{len(tampered)} chunk(s) to one member: caught by {len(honest)}/{len(honest)} honest "
        f"members in the round, its span kept local on each, honest vectors equal elsewhere "
        f"(max abs difference {spread}, {off:.1e} relative L2 from the mean); a peer outside "
        f"the round banned it on the DHT proof; round 2 averaged 100 % among the honest"
    )
