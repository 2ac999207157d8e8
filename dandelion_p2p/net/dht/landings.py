"""Wake-ups for readers of a node's own store: ``DHTNode.landing``.

A reader that waits for records under a key this node serves (a round's announcements) reads
the store, takes the key's event with no checkpoint in between, and awaits the event instead
of polling: the next record stored under the key sets it. Events exist only for keys someone
waits on; each is dropped once set, and at most ``MAX_WATCHED`` are held (the oldest is set
early, a spurious wake-up its reader survives by reading again).
"""

from __future__ import annotations

from collections import OrderedDict

import trio

MAX_WATCHED = 64
"""Keys waited on at once: a node's own matchmaking waits on one or two."""


class Landings:
    def __init__(self) -> None:
        self._events: OrderedDict[bytes, trio.Event] = OrderedDict()

    def __len__(self) -> int:
        return len(self._events)

    def event(self, target: bytes) -> trio.Event:
        """Set when the next record is stored under the routing key ``target``."""
        event = self._events.get(target)
        if event is None:
            event = self._events[target] = trio.Event()
            while len(self._events) > MAX_WATCHED:
                self._events.popitem(last=False)[1].set()
        return event

    def landed(self, target: bytes) -> None:
        """A record was stored under ``target``: wake whoever waits for one."""
        event = self._events.pop(target, None)
        if event is not None:
            event.set()
