"""Time series the daemon keeps for charts and ``/metrics``: loss, samples/s, averaging round
time, fraction averaged, ... Each series is bounded; points are (unix time, value)."""

from __future__ import annotations

import math
import re
import threading
import time
from collections import deque
from dataclasses import dataclass

MAX_POINTS = 10_000
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


@dataclass(frozen=True, slots=True)
class Point:
    time: float
    value: float


class Telemetry:
    """Named, bounded series of points. Names are ``[a-z][a-z0-9_]*`` so they double as
    Prometheus metric names. Non-finite values are refused: a chart or a scrape must never
    carry NaN that came from a broken worker."""

    def __init__(self, max_points: int = MAX_POINTS) -> None:
        self._series: dict[str, deque[Point]] = {}
        self._help: dict[str, str] = {}
        self._max_points = max_points
        self._lock = threading.Lock()

    def describe(self, name: str, help_text: str) -> None:
        self._check_name(name)
        self._help[name] = help_text

    def record(self, name: str, value: float, when: float | None = None) -> None:
        """Append a point; raises ``ValueError`` for a bad name or a non-finite value."""
        self._check_name(name)
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{name}: value must be finite, got {value}")
        point = Point(when if when is not None else time.time(), value)
        with self._lock:
            series = self._series.get(name)
            if series is None:
                series = self._series[name] = deque(maxlen=self._max_points)
            series.append(point)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._series)

    def help_text(self, name: str) -> str:
        return self._help.get(name, name.replace("_", " "))

    def series(self, name: str, since: float = 0.0) -> list[Point]:
        """Points of ``name`` newer than ``since`` (unix time), oldest first."""
        with self._lock:
            points = list(self._series.get(name, ()))
        return [p for p in points if p.time > since]

    def latest(self, name: str) -> Point | None:
        with self._lock:
            series = self._series.get(name)
            return series[-1] if series else None

    @staticmethod
    def _check_name(name: str) -> None:
        if not _NAME.fullmatch(name):
            raise ValueError(f"bad series name {name!r}")
