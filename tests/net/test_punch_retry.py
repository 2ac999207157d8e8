"""When a peer reachable only through a relay gets a new hole-punch budget (the schedule,
without I/O; the late-punch netlab test runs it on real NATs)."""

from __future__ import annotations

from dandelion_p2p.net.punch_retry import RETRY_AFTER, RETRY_MAX, PunchSchedule, drives_punch

RELAYED_SPENT = (True, True)


def renewals(schedule: PunchSchedule, peer: str, start: float) -> tuple[float, float]:
    """Seconds from a budget seen spent at ``start`` to its renewal, and the clock then."""
    now = start
    while not schedule.renew({peer: RELAYED_SPENT}, now):
        now += 1.0
    return now - start, now


def test_a_spent_budget_is_renewed_after_waits_that_double_up_to_the_cap() -> None:
    schedule = PunchSchedule()
    waits, now = [], 0.0
    for _ in range(8):
        wait, now = renewals(schedule, "a", now)
        waits.append(wait)
    assert waits[:5] == [RETRY_AFTER * 2**k for k in range(5)]
    assert waits[5:] == [RETRY_MAX] * 3


def test_only_relayed_peers_with_a_spent_budget_are_renewed() -> None:
    schedule = PunchSchedule()
    peers = {"spent": RELAYED_SPENT, "trying": (True, False), "direct": (False, True)}
    assert schedule.renew(peers, 0.0) == []
    assert schedule.renew(peers, RETRY_AFTER) == ["spent"]
    assert schedule.tracked() == 1


def test_a_peer_that_went_direct_or_away_starts_again_from_the_first_wait() -> None:
    schedule = PunchSchedule()
    _, now = renewals(schedule, "a", 0.0)
    _, now = renewals(schedule, "a", now)  # the next wait is now 4 x RETRY_AFTER
    assert schedule.renew({"a": (False, True)}, now) == []  # a direct connection came
    assert schedule.tracked() == 0
    assert renewals(schedule, "a", now)[0] == RETRY_AFTER
    schedule.renew({}, now)  # disconnected
    assert schedule.tracked() == 0


def test_exactly_one_end_of_a_connection_starts_the_punches() -> None:
    a, b = b"\x00\x24\x08\x01a", b"\x00\x24\x08\x01b"
    assert drives_punch(a, b) != drives_punch(b, a)
