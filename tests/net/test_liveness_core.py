"""The liveness core without sockets: when a connection is pinged and when it is dead."""

from __future__ import annotations

import itertools
from collections.abc import Hashable

import pytest

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.net.liveness_core import Due, LivenessSettings, LivenessTracker

SETTINGS = LivenessSettings(interval=5.0, dead_after=15.0, check_every=1.0)


def run_until(tracker: LivenessTracker, start: float, end: float, *, answer: bool,
              heard_every: float | None = None) -> tuple[list[float], float | None]:
    """Step once a second as the adapter does; pings are answered at once when ``answer``.
    Returns the times pings went out and when the connection was found dead."""
    pings: list[float] = []
    now = start
    while now <= end:
        if heard_every is not None and (now - start) % heard_every == 0:
            tracker.heard("c", now)
        due = tracker.due(now)
        if "c" in due.dead:
            return pings, now
        if "c" in due.ping:
            pings.append(now)
            tracker.ping_started("c", now)
            if answer:
                tracker.ping_ended("c", now + 0.05, answered=True)
        now += SETTINGS.check_every
    return pings, None


def test_an_idle_connection_that_answers_is_pinged_every_interval_and_kept() -> None:
    tracker = LivenessTracker(SETTINGS)
    tracker.track("c", 0.0)
    pings, dead_at = run_until(tracker, 0.0, 60.0, answer=True)
    assert dead_at is None
    assert pings[:3] == [5.0, 11.0, 17.0]
    assert all(b - a >= SETTINGS.interval for a, b in itertools.pairwise(pings))


def test_a_busy_connection_is_not_pinged() -> None:
    tracker = LivenessTracker(SETTINGS)
    tracker.track("c", 0.0)
    pings, dead_at = run_until(tracker, 0.0, 60.0, answer=False, heard_every=2.0)
    assert pings == [] and dead_at is None


def test_a_silent_connection_is_dead_within_the_bound_after_its_last_byte() -> None:
    tracker = LivenessTracker(SETTINGS)
    tracker.track("c", 0.0)
    tracker.heard("c", 7.3)
    pings, dead_at = run_until(tracker, 8.0, 60.0, answer=False)
    assert dead_at is not None
    assert 7.3 + SETTINGS.dead_after <= dead_at <= 7.3 + SETTINGS.bound
    # Two pings went unanswered before it was given up (one in flight at a time).
    assert len(pings) == 1 or pings[1] - pings[0] >= SETTINGS.interval
    assert "c" not in tracker


def ticks(tracker: LivenessTracker, start: float, end: float) -> Due:
    """Calls ``due`` once a second from ``start`` to ``end`` as the adapter does; what is due
    at ``end``, with every connection found dead on the way."""
    dead: list[Hashable] = []
    now = start
    while now < end:
        dead += tracker.due(now).dead
        now += SETTINGS.check_every
    last = tracker.due(end)
    return Due(ping=last.ping, dead=(*dead, *last.dead))


def test_a_ping_that_fails_leaves_room_for_the_next_after_an_interval() -> None:
    tracker = LivenessTracker(SETTINGS)
    tracker.track("c", 0.0)
    assert ticks(tracker, 0.0, 5.0).ping == ("c",)
    tracker.ping_started("c", 5.0)
    assert ticks(tracker, 6.0, 9.0).ping == ()
    tracker.ping_ended("c", 9.0, answered=False)
    assert tracker.due(9.5).ping == ()
    assert tracker.due(10.0).ping == ("c",)
    assert tracker.quiet_for("c", 10.0) == 10.0


def test_a_late_answer_revives_a_quiet_connection() -> None:
    tracker = LivenessTracker(SETTINGS)
    tracker.track("c", 0.0)
    tracker.ping_started("c", 5.0)
    tracker.ping_ended("c", 14.0, answered=True)
    assert ticks(tracker, 0.0, 28.0).dead == ()
    assert tracker.due(29.0).dead == ("c",)


def test_time_never_runs_backwards_for_a_connection() -> None:
    tracker = LivenessTracker(SETTINGS)
    tracker.track("c", 10.0)
    tracker.heard("c", 3.0)
    assert tracker.quiet_for("c", 12.0) == 2.0


def test_forgotten_and_unknown_connections_are_ignored() -> None:
    tracker = LivenessTracker(SETTINGS)
    tracker.track("a", 0.0)
    tracker.track("b", 0.0)
    tracker.forget("a")
    tracker.heard("zzz", 1.0)
    tracker.ping_ended("zzz", 1.0, answered=True)
    assert tracker.tracked() == ["b"] and len(tracker) == 1
    assert ticks(tracker, 0.0, 100.0).dead == ("b",)


@pytest.mark.parametrize(
    ("interval", "dead_after", "check_every"),
    [(5.0, 5.0, 1.0), (5.0, 15.0, 0.0), (5.0, 15.0, 6.0), (0.0, 15.0, 0.0)],
)
def test_inconsistent_settings_are_refused(
    interval: float, dead_after: float, check_every: float
) -> None:
    with pytest.raises(ConfigError):
        LivenessSettings(interval=interval, dead_after=dead_after, check_every=check_every)


def test_a_stall_of_our_own_process_does_not_count_as_silence() -> None:
    tracker = LivenessTracker(SETTINGS)
    tracker.track("c", 0.0)
    assert tracker.due(1.0).dead == ()
    # The process did not run for 30 s: nothing could be read meanwhile.
    assert tracker.due(31.0).dead == ()
    # Quiet for 1 s before the stall, and for one ordinary check interval across it.
    assert tracker.quiet_for("c", 31.0) == 2.0
    # Afterwards silence counts again.
    for now in range(32, 44):
        assert tracker.due(float(now)).dead == ()
    assert tracker.due(44.0).dead == ("c",)
