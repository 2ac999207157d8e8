"""Averaging channels kept open from one round to the next.

Opening a channel costs a libp2p stream, the data plane's handshake and a TCP dial: about
6 ms of CPU on loopback and several round trips on a real link, for each pair of members in
every round. On a channel of purpose ``averaging/2`` a member done with a round says so with
a ``ChannelIdle`` frame instead of closing; once both ends have said it the channel is idle,
and the opener begins its next round with that member on it with a new ``ChannelHello``
(protocol/averaging.md section 6.6). ``KeptChannels`` holds the opener's idle channels;
the acceptor's wait in its inbound handler (``accepted_channels``) for the next hello.

An idle channel is watched: a frame on it (a member sends nothing between rounds), its end,
or ``REUSE_WITHIN`` seconds without a round closes it, so what it can hold is one frame, not
a credit window, and not past that time.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict

import trio

from dandelion_p2p.averaging.messages import idle_in
from dandelion_p2p.dataplane.channel import Channel
from dandelion_p2p.errors import DandelionError

log = logging.getLogger(__name__)

PURPOSE_ONE_ROUND = "averaging/1"
"""Channels that carry one round and are closed at its end (still served, and opened to a
peer that does not serve ``averaging/2``)."""
PURPOSE_KEPT = "averaging/2"
"""Channels that may carry one round after another."""

REUSE_WITHIN = 60.0
"""Seconds the opener keeps an idle channel for the member's next round; half the
acceptor's ``KEEP_IDLE``, so that a hello is not sent just as the acceptor closes."""
KEEP_IDLE = 120.0
"""Seconds the acceptor waits on an idle channel for the next round's hello."""
REST_TIMEOUT = 5.0
"""Seconds an end waits, after its own ``ChannelIdle``, for the other's."""
KEPT_FOR = 300.0
"""Seconds from a channel's opening after which it is closed at its next rest: a new one then
takes whatever path the data plane now finds (a direct connection where a relayed one was
kept, say), and a connection being replaced is not held past its drain."""
MAX_IDLE = 64
"""Idle channels one opener keeps in all (one per member)."""
MAX_ONE_ROUND_PEERS = 1024
"""Peers remembered to serve ``averaging/1`` only."""


async def rest(channel: Channel, run: bytes, round_: int, peer_rested: bool) -> bool:
    """After our ``ChannelIdle`` (the round's writer sent it), read ``channel`` until the
    other end says it is done with ``round_`` too (``peer_rested``: it did already),
    dropping the round's late frames.

    True: both ends are done and the channel is idle; False: it is not (the other end went
    quiet, closed, or named another round) and the caller closes it.
    """
    try:
        with trio.fail_after(REST_TIMEOUT):
            while not peer_rested:
                idle = idle_in(await channel.receive())
                if idle is not None:
                    if idle.run != run or idle.round != round_:
                        log.info("channel to %s: idle for round %d, not %d", channel.peer_id,
                                 idle.round, round_)
                        return False
                    peer_rested = True
    except (DandelionError, trio.TooSlowError) as exc:
        log.debug("channel to %s not kept after round %d: %s", channel.peer_id, round_, exc)
        return False
    # For good: a kept channel's later rounds decrypt into fresh buffers, not pooled ones.
    # Measured with 8 peers x 25 MB on 2 cores (benchmarks/README.md), that made the
    # all-reduce faster, not slower (0.88-0.90 s against 1.03-1.12 s with the pool kept).
    channel.release_buffers()
    return True


async def close(channel: Channel) -> None:
    with trio.move_on_after(2.0) as scope:
        scope.shield = True
        await channel.aclose()


class _Idle:
    __slots__ = ("channel", "watch")

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.watch = trio.CancelScope()
        """Cancelled when the channel is taken for a round."""


class KeptChannels:
    """The idle channels of one averager's rounds that it opened (see the module
    documentation): at most one per member and ``MAX_IDLE`` in all, each watched while it
    idles and closed after ``REUSE_WITHIN`` seconds unless a round takes it, none kept once
    it is older than ``KEPT_FOR``.

    ``background`` runs each channel's rest and watch after its round; without it channels
    are closed at the end of their round, as on ``averaging/1``.
    """

    def __init__(self, background: trio.Nursery | None) -> None:
        self.background = background
        self._idle: OrderedDict[bytes, _Idle] = OrderedDict()
        self._one_round_only: OrderedDict[bytes, None] = OrderedDict()
        self.keeping = True
        """False once the averager stops: channels are closed at their round's end."""
        self.reused = 0
        """Rounds begun on a kept channel (for logs and tests)."""

    def __len__(self) -> int:
        return len(self._idle)

    def purpose_for(self, peer: bytes) -> str:
        """The purpose to open a channel to ``peer`` with."""
        return PURPOSE_ONE_ROUND if peer in self._one_round_only else PURPOSE_KEPT

    def serves_one_round_only(self, peer: bytes) -> None:
        """``peer`` refused ``averaging/2`` and took ``averaging/1``: open that from now on."""
        self._one_round_only[peer] = None
        self._one_round_only.move_to_end(peer)
        while len(self._one_round_only) > MAX_ONE_ROUND_PEERS:
            self._one_round_only.popitem(last=False)

    def take(self, peer: bytes) -> Channel | None:
        """An idle channel to ``peer`` to begin a round on, or None."""
        idle = self._idle.pop(peer, None)
        if idle is None:
            return None
        idle.watch.cancel()
        if not idle.channel.is_open or idle.channel.finished.is_set():
            self._drop(idle.channel)
            return None
        self.reused += 1
        return idle.channel

    def keep_only(self, peers: set[bytes]) -> None:
        """Close the idle channels to members not in ``peers`` (a round's group): the
        slots they hold on the members' side are better given back than kept for a round
        that may not pair them again."""
        for peer in [p for p in self._idle if p not in peers]:
            self._discard(self._idle.pop(peer))

    async def release(self, channel: Channel, peer: bytes, run: bytes, round_: int,
                      peer_rested: bool) -> None:
        """The round is done with ``channel``: keep it once it rests, or close it."""
        if (self.background is not None and self.keeping
                and channel.purpose == PURPOSE_KEPT and channel.is_open):
            try:
                self.background.start_soon(self._rest_then_keep, channel, peer, run, round_,
                                           peer_rested)
                return
            except RuntimeError:  # the node is stopping: its nursery takes no more tasks
                pass
        await close(channel)

    def close_all(self) -> None:
        """Drop every idle channel and keep none from now on (the averager stops): the
        acceptors see them cut off."""
        self.keeping = False
        for peer in list(self._idle):
            idle = self._idle.pop(peer)
            idle.watch.cancel()
            idle.channel.abort()

    async def _rest_then_keep(self, channel: Channel, peer: bytes, run: bytes, round_: int,
                              peer_rested: bool) -> None:
        if not await rest(channel, run, round_, peer_rested) or not self.keeping or (
                time.monotonic() - channel.created > KEPT_FOR):
            await close(channel)
            return
        older = self._idle.pop(peer, None)
        if older is not None:
            self._discard(older)
        idle = self._idle[peer] = _Idle(channel)
        while len(self._idle) > MAX_IDLE:
            self._discard(self._idle.popitem(last=False)[1])
        # A member sends nothing on an idle channel: a frame, its end, or REUSE_WITHIN
        # seconds without a round end the wait.
        with idle.watch, contextlib.suppress(DandelionError):
            await channel.receive(timeout=REUSE_WITHIN)
        if idle.watch.cancelled_caught:
            return  # taken for a round (or dropped by whoever cancelled the watch)
        if self._idle.get(peer) is idle:
            del self._idle[peer]
        self._drop(channel)

    def _discard(self, idle: _Idle) -> None:
        """Stop watching an idle channel taken out of ``_idle``, and close it."""
        idle.watch.cancel()
        self._drop(idle.channel)

    def _drop(self, channel: Channel) -> None:
        """Close an idle channel in order when there is a nursery to do it, else cut it off."""
        if self.background is not None:
            try:
                self.background.start_soon(close, channel)
                return
            except RuntimeError:  # the node is stopping
                pass
        channel.abort()
