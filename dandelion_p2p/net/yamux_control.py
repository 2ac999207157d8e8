"""yamux's reader must never wait behind a data writer.

py-libp2p's yamux reader answers pings and acknowledges (or refuses) new streams inline: it
writes the 12-byte control frame under the connection's write lock before reading on. When
both ends stream data at once, each writer can sit in a blocked socket send holding that lock
while its own reader waits for the lock to answer a ping: neither end reads any more and the
connection deadlocks for good (reproduced with pings every 5 ms: half the runs of a 64 MiB
each-way exchange hung). Other yamux implementations queue control frames for a separate
writer; here the reader hands them to a task of the connection and reads on.

The number of control frames waiting per connection is bounded: past the bound the reader
writes inline as before, so a peer flooding us with pings costs it throughput, not our memory.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from libp2p.stream_muxer.yamux.yamux import Yamux

logger = logging.getLogger(__name__)

MAX_QUEUED_CONTROL_FRAMES = 64

_in_reader: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "dandelion_yamux_reader", default=False
)
_installed = False


def install() -> None:
    """Patch :class:`Yamux` once per process; later calls do nothing."""
    global _installed
    if _installed:
        return
    read_loop: Callable[[Yamux], Awaitable[None]] = Yamux.handle_incoming
    write_frame: Callable[[Yamux, bytes], Awaitable[None]] = Yamux._write_frame

    async def handle_incoming(self: Yamux) -> None:
        # A context variable, not a flag on the connection: only writes made by this task
        # (the reader) are handed off; streams' own writes keep their order and back-pressure.
        _in_reader.set(True)
        await read_loop(self)

    async def queued_write(self: Yamux, frame: bytes) -> None:
        try:
            await write_frame(self, frame)
        except Exception as exc:  # the reader sees the broken connection on its next read
            logger.debug("yamux control frame to %s not sent: %r", self.peer_id, exc)
        finally:
            state: Any = self
            state._dandelion_queued_control -= 1

    async def _write_frame(self: Yamux, data: bytes) -> None:
        state: Any = self
        nursery = getattr(self, "_nursery", None)
        queued = getattr(state, "_dandelion_queued_control", 0)
        if _in_reader.get() and nursery is not None and queued < MAX_QUEUED_CONTROL_FRAMES:
            state._dandelion_queued_control = queued + 1
            nursery.start_soon(queued_write, self, data)
            return
        await write_frame(self, data)

    Yamux.handle_incoming = handle_incoming  # type: ignore[method-assign]
    Yamux._write_frame = _write_frame  # type: ignore[method-assign]
    _installed = True
