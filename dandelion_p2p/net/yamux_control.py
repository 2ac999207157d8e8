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

A frame, once begun, is written whole. Noise advances its nonce when it encrypts, before the
socket write; a write cancelled there (a caller's timeout, a download stopped mid-way) leaves
the peer a nonce behind or a frame cut short, and the peer then closes the whole connection
with every other stream on it. So the lock is waited for as the caller allows, but the write
itself is shielded from the caller's cancellation; a write that takes longer than
``FRAME_WRITE_LIMIT`` closes the connection, which could carry nothing more anyway.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.network.connection.exceptions import RawConnError
from libp2p.stream_muxer.yamux.yamux import Yamux

logger = logging.getLogger(__name__)

MAX_QUEUED_CONTROL_FRAMES = 64
FRAME_WRITE_LIMIT = 30.0
"""Seconds a frame's write may take (a window of 256 KiB at 70 kbit/s) before the connection
is given up."""

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
    write_frame = _whole_frame_write

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


async def _whole_frame_write(self: Yamux, data: bytes) -> None:
    """Write one frame under the connection's write lock, never cut short by the caller."""
    async with self._write_lock:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(FRAME_WRITE_LIMIT) as limit:
                await self.secured_conn.write(data)
            if limit.cancelled_caught:
                logger.info("a yamux frame to %s took over %g s: closing the connection",
                            self.peer_id, FRAME_WRITE_LIMIT)
                await self.secured_conn.close()
                raise RawConnError(f"frame write over {FRAME_WRITE_LIMIT} s")
    await trio.lowlevel.checkpoint()
