"""The daemon's log, kept in memory for live viewers: every line numbered, a bounded
scrollback, and any number of subscribers that each receive every new line."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import trio

DEFAULT_SCROLLBACK = 5000
SUBSCRIBER_BUFFER = 2000


@dataclass(frozen=True, slots=True)
class LogLine:
    seq: int
    time: float
    level: str
    logger: str
    message: str

    def to_dict(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "time": self.time,
            "level": self.level,
            "logger": self.logger,
            "message": self.message,
        }


class LogHub(logging.Handler):
    """A logging handler that numbers lines, keeps the last ``scrollback`` of them and fans
    each one out to subscribers.

    A subscriber that falls more than ``SUBSCRIBER_BUFFER`` lines behind loses the oldest ones
    (it can see the gap in ``seq`` and re-read the scrollback); a slow viewer never blocks the
    daemon's logging. Lines logged from other threads (the worker's output reader, say) are
    accepted too.
    """

    def __init__(self, scrollback: int = DEFAULT_SCROLLBACK, level: int = logging.INFO) -> None:
        super().__init__(level)
        self._lines: deque[LogLine] = deque(maxlen=scrollback)
        self._seq = 0
        self._lock = threading.Lock()
        self._subscribers: set[trio.MemorySendChannel[LogLine]] = set()
        self._token: trio.lowlevel.TrioToken | None = None
        self.setFormatter(logging.Formatter("%(message)s"))

    def bind(self) -> None:
        """Remember the running trio loop, so lines from other threads reach subscribers."""
        self._token = trio.lowlevel.current_trio_token()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.add(record.levelname.lower(), record.name, message, record.created)

    def add(self, level: str, logger: str, message: str, when: float | None = None) -> LogLine:
        with self._lock:
            self._seq += 1
            line = LogLine(self._seq, when or time.time(), level, logger, message)
            self._lines.append(line)
        self._publish(line)
        return line

    def lines(self, after: int = 0, limit: int = DEFAULT_SCROLLBACK) -> list[LogLine]:
        """Kept lines with ``seq > after``, oldest first, at most ``limit`` (the newest)."""
        with self._lock:
            found = [line for line in self._lines if line.seq > after]
        return found[-limit:] if limit > 0 else []

    @property
    def last_seq(self) -> int:
        return self._seq

    @contextmanager
    def subscribe(self) -> Iterator[trio.MemoryReceiveChannel[LogLine]]:
        """Receive every line logged from now on, until the block exits."""
        send, receive = trio.open_memory_channel[LogLine](SUBSCRIBER_BUFFER)
        self._subscribers.add(send)
        try:
            yield receive
        finally:
            self._subscribers.discard(send)
            send.close()

    def _publish(self, line: LogLine) -> None:
        try:
            trio.lowlevel.current_task()
            in_loop = True
        except RuntimeError:
            in_loop = False
        if in_loop:
            self._deliver(line)
        elif self._token is not None:
            with suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._deliver, line)

    def _deliver(self, line: LogLine) -> None:
        for send in list(self._subscribers):
            try:
                send.send_nowait(line)
            except trio.WouldBlock:
                # Drop this line for the laggard; the seq gap tells it so.
                pass
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._subscribers.discard(send)


