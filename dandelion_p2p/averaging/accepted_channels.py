"""The averaging channels that members with smaller peer ids open to this peer.

Each channel's hello names a round: the channel is handed to that round's link with the member
once this peer has matched the round. On an ``averaging/2`` channel the handler then lets it
rest and waits on it for the member's next hello (``kept_channels``), so one channel carries
round after round; an ``averaging/1`` channel ends with its round.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import trio

from dandelion_p2p.averaging.kept_channels import KEEP_IDLE, MAX_IDLE, PURPOSE_KEPT, rest
from dandelion_p2p.averaging.member_links import Round
from dandelion_p2p.averaging.messages import ChannelHello, ChannelIdle, decode_hello, encode_idle
from dandelion_p2p.dataplane.channel import Channel
from dandelion_p2p.errors import DandelionError, PeerUnavailable, ProtocolViolation

log = logging.getLogger(__name__)

RoundLookup = Callable[[int], Awaitable[Round | None]]
"""The round a hello names, once this peer has matched it; None when it does not run it
here (it is over, or it never came)."""


class AcceptedChannels:
    """The inbound handler of the averaging purposes (see the module documentation). At
    most one idle channel per member and ``MAX_IDLE`` in all are kept, each for
    ``KEEP_IDLE`` seconds; ``keeping`` says whether to keep any."""

    def __init__(self, *, run: bytes, open_timeout: float, round_for: RoundLookup,
                 keeping: Callable[[], bool]) -> None:
        self.run = run
        self.open_timeout = open_timeout
        self.round_for = round_for
        self.keeping = keeping
        self._idle: OrderedDict[bytes, Channel] = OrderedDict()

    def __len__(self) -> int:
        return len(self._idle)

    def close_all(self) -> None:
        """Cut off every idle channel (the averager stops)."""
        while self._idle:
            self._idle.popitem(last=False)[1].abort()

    async def handle(self, channel: Channel) -> None:
        """Serve one inbound channel, for one round or (``averaging/2``) one after another."""
        peer = channel.peer_id.to_bytes()
        wait = self.open_timeout
        while True:
            try:
                hello = decode_hello(await channel.receive(timeout=wait))
            except (ProtocolViolation, PeerUnavailable) as exc:
                if wait == self.open_timeout:
                    log.info("averaging channel from %s refused: %s", channel.peer_id, exc)
                return
            finally:
                if self._idle.get(peer) is channel:
                    del self._idle[peer]
            returned = await self._serve(channel, hello)
            if channel.purpose != PURPOSE_KEPT:
                return
            if returned is None:
                # Said in order, so that the opener of a kept channel does not take the
                # refusal for a lost channel and open another to be refused again.
                with trio.move_on_after(1.0), contextlib.suppress(DandelionError):
                    await channel.send(encode_idle(ChannelIdle(run=hello.run,
                                                               round=hello.round)))
                return
            if not await rest(channel, self.run, hello.round, returned) or not self.keeping():
                return
            self._keep(peer, channel)
            wait = KEEP_IDLE

    def _keep(self, peer: bytes, channel: Channel) -> None:
        older = self._idle.pop(peer, None)
        if older is not None:
            older.abort()
        self._idle[peer] = channel
        while len(self._idle) > MAX_IDLE:
            self._idle.popitem(last=False)[1].abort()

    async def _serve(self, channel: Channel, hello: ChannelHello) -> bool | None:
        """Hand ``channel`` to the round ``hello`` names and wait until the round is done with
        it: whether the member said it is done too (the channel went back intact, and may be
        kept), or None (it was closed, or not taken). Returning at once closes an
        ``averaging/1`` channel, which tells its opener that the round is not run here."""
        if hello.run != self.run:
            return None
        rnd = await self.round_for(hello.round)
        peer = channel.peer_id.to_bytes()
        if rnd is None or peer not in rnd.inbound:
            return None
        try:
            rnd.inbound[peer].send_nowait(channel)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return None
        # Until the round is done with the channel, or the channel ends (lost and replaced by
        # another: the data plane then gives its slot back).
        async with trio.open_nursery() as nursery:

            async def until(event: trio.Event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(until, rnd.finished)
            nursery.start_soon(until, channel.finished)
            nursery.start_soon(until, rnd.returned_events[peer])
        returned = rnd.returned.get(peer)
        if returned is None or returned[0] is not channel or channel.finished.is_set():
            return None
        return returned[1]
