"""The wake-ups of readers of a node's own store (``net/dht/landings.py``)."""

from __future__ import annotations

from dandelion_p2p.net.dht import landings
from dandelion_p2p.net.dht.landings import Landings


def test_a_landing_wakes_the_waiters_of_its_key_alone_and_once() -> None:
    watched = Landings()
    first, other = watched.event(b"a"), watched.event(b"b")
    assert watched.event(b"a") is first  # one event per key while nothing landed
    watched.landed(b"a")
    assert first.is_set() and not other.is_set()
    # The next reader waits for the next landing, not the one it already saw.
    assert not watched.event(b"a").is_set()
    watched.landed(b"unwatched")  # nobody waits: nothing is kept
    assert len(watched) == 2


def test_keys_waited_on_are_bounded_and_the_oldest_is_woken_early() -> None:
    watched = Landings()
    events = [watched.event(bytes([i])) for i in range(landings.MAX_WATCHED + 3)]
    assert len(watched) == landings.MAX_WATCHED
    assert all(e.is_set() for e in events[:3])
    assert not any(e.is_set() for e in events[3:])
