"""When a connection counts as dead: the sans-IO core of connection liveness.

py-libp2p's own health checks never close a connection that has open streams, and a
connection through a relay always has some, so a hung or black-holed relay kept its
connections (and every request over them timed out) for as long as the fault lasted. Here
each connection is judged by what arrives on it: any inbound bytes (data, window updates, a
ping's answer) prove the path works. A connection that has been quiet for ``interval`` is
pinged; one from which nothing at all arrived for ``dead_after`` is dead.

Judging by inbound bytes rather than by ping answers alone keeps a busy connection alive
whose pings wait behind megabytes of queued data: while the other side reads our data its
window updates keep arriving, and while it sends, its data does.

Time is passed in as a number (``trio.current_time()`` in the adapter); keys are whatever
identifies a connection to the adapter.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from dandelion_p2p.errors import ConfigError


@dataclass(frozen=True)
class LivenessSettings:
    interval: float = 5.0
    """A connection from which nothing arrived for this long is pinged."""
    dead_after: float = 15.0
    """A connection from which nothing arrived for this long is closed: three ping
    intervals, so two pings have gone unanswered for at least one interval each."""
    check_every: float = 1.0
    """How often the adapter asks what is due; adds at most this much to ``dead_after``."""

    def __post_init__(self) -> None:
        if not 0 < self.check_every <= self.interval < self.dead_after:
            raise ConfigError(
                "liveness needs 0 < check_every <= interval < dead_after, got "
                f"{self.check_every}, {self.interval}, {self.dead_after}"
            )

    @property
    def bound(self) -> float:
        """Longest time from the last byte of a dead connection to its closing."""
        return self.dead_after + self.check_every


@dataclass
class _Conn:
    heard_at: float
    ping_started: float | None = None
    last_ping: float = field(default=float("-inf"))


@dataclass(frozen=True)
class Due:
    ping: tuple[Hashable, ...]
    dead: tuple[Hashable, ...]


class LivenessTracker:
    """Per connection: when something last arrived, and whether a ping is out."""

    def __init__(self, settings: LivenessSettings | None = None) -> None:
        self.settings = settings or LivenessSettings()
        self._conns: dict[Hashable, _Conn] = {}
        self._last_due: float | None = None

    def __contains__(self, key: Hashable) -> bool:
        return key in self._conns

    def __len__(self) -> int:
        return len(self._conns)

    def track(self, key: Hashable, now: float) -> None:
        """A new connection: it counts as heard from when it is first seen."""
        self._conns.setdefault(key, _Conn(heard_at=now))

    def forget(self, key: Hashable) -> None:
        self._conns.pop(key, None)

    def tracked(self) -> list[Hashable]:
        return list(self._conns)

    def heard(self, key: Hashable, now: float) -> None:
        conn = self._conns.get(key)
        if conn is not None and now > conn.heard_at:
            conn.heard_at = now

    def ping_started(self, key: Hashable, now: float) -> None:
        conn = self._conns.get(key)
        if conn is not None:
            conn.ping_started = now
            conn.last_ping = now

    def ping_ended(self, key: Hashable, now: float, *, answered: bool) -> None:
        conn = self._conns.get(key)
        if conn is None:
            return
        conn.ping_started = None
        if answered:
            self.heard(key, now)

    def quiet_for(self, key: Hashable, now: float) -> float:
        conn = self._conns.get(key)
        return 0.0 if conn is None else max(0.0, now - conn.heard_at)

    def due(self, now: float) -> Due:
        """Connections to ping now, and connections to close as dead (which are forgotten).

        Called every ``check_every`` seconds. When a call comes late (the process was
        stalled: swapped out, stopped, a long computation on the event loop), the time it
        was not running does not count as silence: bytes that came meanwhile are still
        waiting to be read.
        """
        last, self._last_due = self._last_due, now
        if last is not None and now - last > 2 * self.settings.check_every:
            credit = now - last - self.settings.check_every
            for conn in self._conns.values():
                conn.heard_at = min(now, conn.heard_at + credit)
        ping: list[Hashable] = []
        dead: list[Hashable] = []
        for key, conn in self._conns.items():
            quiet = now - conn.heard_at
            if quiet >= self.settings.dead_after:
                dead.append(key)
            elif (
                conn.ping_started is None
                and quiet >= self.settings.interval
                and now - conn.last_ping >= self.settings.interval
            ):
                ping.append(key)
        for key in dead:
            del self._conns[key]
        return Due(ping=tuple(ping), dead=tuple(dead))
