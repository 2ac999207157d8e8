"""The channels of an averaging round to the other members: opened, pumped both ways, and
replaced when lost mid-round.

``Round`` is one round's transport state (a queue of frames per member, the channels, who is
connected); ``MemberLinks.link`` runs one member's channel for a round: the member with the
smaller peer id opens it, the other takes it from the inbound handler; frames are written
and read until the round ends. A channel that breaks while the round still needs the member
is replaced, and what it may not have delivered is written again (protocol/averaging.md
section 14.2). At the round's end a channel is kept for the member's next round
(``kept_channels``) or closed.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Set
from typing import TYPE_CHECKING

import trio
from libp2p.peer.id import ID

from dandelion_p2p.averaging.allreduce import AllReducePeer
from dandelion_p2p.averaging.group import GroupSpec
from dandelion_p2p.averaging.kept_channels import (
    PURPOSE_KEPT,
    PURPOSE_ONE_ROUND,
    KeptChannels,
    close,
)
from dandelion_p2p.averaging.messages import (
    ChannelHello,
    ChannelIdle,
    encode_hello,
    encode_idle,
    idle_in,
)
from dandelion_p2p.averaging.ports import ChannelOpener, PeerLinks, PeerReputation
from dandelion_p2p.averaging.sends import MAX_RESENDS, Send
from dandelion_p2p.dataplane.channel import Channel
from dandelion_p2p.dataplane.errors import ChannelClosed
from dandelion_p2p.errors import DandelionError, PeerUnavailable, RemoteRejected
from dandelion_p2p.wire import RejectCode

if TYPE_CHECKING:
    from dandelion_p2p.averaging.averager import AveragingSettings

log = logging.getLogger(__name__)

REOPEN_RETRY = 0.5
"""Seconds between tries to open a new channel to a member whose channel was lost."""
KEPT_HELLO_TIMEOUT = 1.0
"""Seconds a hello on a kept channel may wait for credit before a new channel is opened."""
ASK_IF_LEFT_EVERY = 1.0
"""Seconds between two looks, while a member's channel is awaited, at whether the member
announced that it leaves the round (``MemberLinks(left=)``)."""

LeftRound = Callable[[int, bytes], Awaitable[bool]]
"""Whether a peer announced that it leaves a round (its announcement for the round is now a
``leaving`` one)."""


class Round:
    """One round in progress: the channels to the group as formed, a queue of frames per
    member, and (once the channels are settled) the state machine over the members kept."""

    def __init__(self, spec: GroupSpec, me: bytes) -> None:
        self._state: AllReducePeer | None = None
        self.spec = spec
        self.ready = trio.Event()
        """Set when the state machine exists: frames are read from then on."""
        self.outboxes: dict[bytes, trio.MemorySendChannel[Send]] = {}
        self.inboxes: dict[bytes, trio.MemoryReceiveChannel[Send]] = {}
        for peer in spec.peer_ids:
            if peer != me:
                send, recv = trio.open_memory_channel[Send](math.inf)
                self.outboxes[peer] = send
                self.inboxes[peer] = recv
        # Channels opened by members with smaller ids, handed over by the inbound handler.
        self.inbound: dict[bytes, trio.MemorySendChannel[Channel]] = {}
        self.inbound_recv: dict[bytes, trio.MemoryReceiveChannel[Channel]] = {}
        for peer in self.outboxes:
            send_ch, recv_ch = trio.open_memory_channel[Channel](1)
            self.inbound[peer] = send_ch
            self.inbound_recv[peer] = recv_ch
        # Set when the round no longer needs any channel (the inbound handlers wait on it,
        # since the data plane closes an inbound channel when its handler returns).
        self.finished = trio.Event()
        self.writing: set[bytes] = set(self.outboxes)
        self.connected: set[bytes] = set()
        self.channels: dict[bytes, Channel] = {}
        self.unreachable: set[bytes] = set()
        self.rested: set[bytes] = set()
        """Members that sent their ``ChannelIdle`` (they ended the round): owed ours alone."""
        self.changed = trio.Event()
        # Accepted channels the round is done with, for their inbound handlers to keep
        # (``hand_back``): the channel, and whether the member said it is done too.
        self.returned: dict[bytes, tuple[Channel, bool]] = {}
        self.returned_events = {peer: trio.Event() for peer in self.outboxes}

    @property
    def state(self) -> AllReducePeer:
        if self._state is None:
            raise RuntimeError("the round's state machine is made once its channels settle")
        return self._state

    def begin(self, state: AllReducePeer) -> None:
        self._state = state
        self.ready.set()

    @property
    def links_settled(self) -> bool:
        return self.connected | self.unreachable >= self.outboxes.keys()

    def skip(self, peers: set[bytes]) -> None:
        """Members not worth a channel (they said they finished the round): unreachable."""
        for peer in peers & self.outboxes.keys():
            self.unreachable.add(peer)
            self.writing.discard(peer)

    def dispatch(self, sends: list[Send]) -> None:
        for send in sends:
            box = self.outboxes.get(send.recipient)
            if box is not None:
                # A closed outbox belongs to a member whose link is gone; its frames are moot.
                with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                    box.send_nowait(send)
        self.changed.set()

    async def until_written(self, among: Set[bytes]) -> None:
        """Until no writer to a connected member of ``among`` has anything left to write."""
        while self.writing & self.connected & among:
            self.changed = trio.Event()
            await self.changed.wait()

    def hand_back(self, peer: bytes, channel: Channel, peer_rested: bool) -> None:
        """An accepted channel this round is done with goes back to its inbound handler."""
        self.returned[peer] = (channel, peer_rested)
        self.returned_events[peer].set()

    def fail(self, peer: bytes, reason: str) -> None:
        if self._state is None:
            self.unreachable.add(peer)
            self.changed.set()
        elif not self.state.done:
            self.dispatch(self.state.on_peer_failed(peer, trio.current_time(), reason))


class MemberLinks:
    """One averager's channels to the members of its rounds (see the module documentation).

    ``settings`` is the averager's: its ``open_timeout``, ``chunk_timeout`` and matchmaking
    ``gather_window`` bound the waits.
    """

    def __init__(
        self,
        *,
        me: bytes,
        run: bytes,
        links: PeerLinks,
        dataplane: ChannelOpener,
        reputation: PeerReputation,
        settings: AveragingSettings,
        left: LeftRound | None = None,
        background: trio.Nursery | None = None,
    ) -> None:
        self.me = me
        self.left = left
        self.kept = KeptChannels(background)
        self.run = run
        self.links = links
        self.dataplane = dataplane
        self.reputation = reputation
        self.settings = settings
        self.reopened = 0
        """Channels lost mid-round and replaced by new ones (for logs and tests)."""

    async def link(self, rnd: Round, round_: int, peer: bytes) -> None:
        """Connect to one member, then pump frames both ways until the round ends. A channel
        lost while the round still needs the member is replaced (at most ``MAX_RESENDS``
        times) and what it may not have delivered is written again on the new one."""
        peer_id = ID(peer)
        s = self.settings
        reused = False
        try:
            if self.me < peer:
                channel, reused = await self._open_by(rnd, round_, peer_id, s.open_timeout)
            else:
                channel = await self._accepted(rnd, round_, peer_id)
        except (DandelionError, trio.TooSlowError) as exc:
            log.info("round %d: no channel to %s: %s", round_, peer_id, exc)
            rnd.writing.discard(peer)
            rnd.fail(peer, f"no channel: {exc}")
            return
        rnd.connected.add(peer)
        rnd.changed.set()
        written: list[Send] = []
        resend: list[Send] = []
        reopened = 0
        while True:
            rnd.channels[peer] = channel
            lost, channel_next = await self._pump(rnd, round_, peer, channel, written, resend,
                                                  reused)
            if lost is None:
                rnd.writing.discard(peer)
                rnd.changed.set()
                return
            if channel_next is None:
                if reopened >= MAX_RESENDS or not rnd.ready.is_set() or not (
                    rnd.state.wants_link(peer)
                ):
                    # Closed in order: the member learns at once that this peer is done
                    # with it, and waits for no new channel.
                    await close(channel)
                    rnd.writing.discard(peer)
                    rnd.fail(peer, lost)
                    return
                # Cut off, not closed: the member too takes it for lost and waits for the
                # new one, where a CLOSE would tell it that this peer ended its round.
                channel.abort()
                try:
                    channel_next, reused = await self._reopen(rnd, round_, peer_id)
                except (DandelionError, trio.TooSlowError) as exc:
                    rnd.writing.discard(peer)
                    rnd.fail(peer, f"{lost}; no new channel: {exc}")
                    return
            elif reopened >= MAX_RESENDS:
                channel.abort()
                await close(channel_next)
                rnd.writing.discard(peer)
                rnd.fail(peer, lost)
                return
            else:
                channel.abort()  # the member replaced it
                reused = False
            reopened += 1
            self.reopened += 1
            channel = channel_next
            resend = rnd.state.resend(peer, written) if rnd.ready.is_set() else []
            log.info("round %d: channel to %s lost (%s); %d frames sent again on a new one",
                     round_, peer_id, lost, len(resend))

    async def _open(
        self, rnd: Round, round_: int, peer_id: ID, timeout: float
    ) -> tuple[Channel, bool]:
        """The round's channel to a member with a larger peer id, the hello that says which
        round it is for sent on it: one kept from an earlier round when there is one and
        the member is still connected (True), else a new one (False)."""
        await self.links.connect_peer(peer_id)
        peer = peer_id.to_bytes()
        hello = encode_hello(ChannelHello(self.run, round_, rnd.spec.group_id))
        kept = self.kept.take(peer) if self.links.is_connected(peer_id) else None
        if kept is not None:
            try:
                # An idle channel has its whole credit: a hello that waits is not worth it.
                await kept.send(hello, timeout=KEPT_HELLO_TIMEOUT)
                return kept, True
            except DandelionError as exc:
                log.debug("kept channel to %s not usable: %s", peer_id, exc)
                await close(kept)
            except BaseException:
                await close(kept)
                raise
        purpose = self.kept.purpose_for(peer)
        try:
            channel = await self.dataplane.open(peer_id, purpose, timeout=timeout)
        except RemoteRejected as exc:
            if purpose != PURPOSE_KEPT or exc.code != RejectCode.NOT_FOUND:
                raise
            channel = await self.dataplane.open(peer_id, PURPOSE_ONE_ROUND, timeout=timeout)
            self.kept.serves_one_round_only(peer)
        try:
            await channel.send(hello)
        except BaseException:
            await close(channel)  # a channel given up on is not left to the round's end
            raise
        return channel, False

    async def _reopen(self, rnd: Round, round_: int, peer_id: ID) -> tuple[Channel, bool]:
        """A new channel to a member whose channel was lost, within the time the round
        allows a silent member (``min(open_timeout, chunk_timeout)``): the opener dials
        again (another relay, or directly, whatever the links find), retrying until then;
        the acceptor waits for it.

        Raises:
            PeerUnavailable: no new channel in time.
        """
        s = self.settings
        timeout = min(s.open_timeout, s.chunk_timeout)
        if self.me > peer_id.to_bytes():
            with trio.move_on_after(timeout):
                return await rnd.inbound_recv[peer_id.to_bytes()].receive(), False
            raise PeerUnavailable(f"{peer_id} opened no new channel in time")
        return await self._open_by(rnd, round_, peer_id, timeout)

    async def _open_by(
        self, rnd: Round, round_: int, peer_id: ID, timeout: float
    ) -> tuple[Channel, bool]:
        """``_open``, tried again until ``timeout`` (a dial through a relay can fail while
        the peer's reservation or our own connection to the relay is being made anew).

        Raises:
            PeerUnavailable: (or what ``_open`` raises last) no channel in time.
        """
        deadline = trio.current_time() + timeout
        while True:
            try:
                with trio.fail_at(deadline):
                    return await self._open(
                        rnd, round_, peer_id, max(0.1, deadline - trio.current_time())
                    )
            except trio.TooSlowError:
                raise PeerUnavailable(f"no new channel to {peer_id} in time") from None
            except DandelionError as exc:
                if trio.current_time() + REOPEN_RETRY >= deadline:
                    raise
                log.debug("new channel to %s not open yet: %s", peer_id, exc)
                await trio.sleep(REOPEN_RETRY)

    async def _pump(
        self, rnd: Round, round_: int, peer: bytes, channel: Channel, written: list[Send],
        resend: list[Send], reused: bool,
    ) -> tuple[str | None, Channel | None]:
        """Frames both ways on ``channel`` until the round ends (None) or the channel is
        lost (why, and the channel the peer opened to replace it, if it did). ``reused``:
        the channel was kept from an earlier round, and its end before the member's first
        frame is a loss (the member closed it idle as the hello went out), not the member's
        end of the round."""
        lost: list[str] = []
        newer: list[Channel] = []
        ended = _Ended(closed_is_lost=reused)
        intact = False
        # Whichever of the reader and the writer ends last ends the link: a member that
        # rested is still owed our ChannelIdle once our round is done here.
        done: set[str] = set()
        try:
            async with trio.open_nursery() as nursery:

                async def write() -> None:
                    failure = await self._write(rnd, round_, peer, channel, written, resend,
                                                ended)
                    done.add("write")
                    if failure is not None:
                        lost.append(failure)
                    if failure is not None or "read" in done:
                        nursery.cancel_scope.cancel()

                async def superseded() -> None:
                    # The opener replaces a channel it lost before we may notice: take the
                    # new one (it writes nothing more on the old).
                    newer.append(await rnd.inbound_recv[peer].receive())
                    lost.append("replaced by the peer")
                    nursery.cancel_scope.cancel()

                nursery.start_soon(write)
                if self.me > peer:
                    nursery.start_soon(superseded)
                failure = await self._read(rnd, round_, peer, channel, ended)
                done.add("read")
                if failure is not None:
                    lost.append(failure)
                if failure is not None or not ended.rested or "write" in done:
                    nursery.cancel_scope.cancel()
            intact = True
        except BaseException as exc:
            intact = _only_cancelled(exc)  # the round ended
            raise
        finally:
            if not lost:  # a lost channel is the caller's to dispose of
                with trio.CancelScope(shield=True):
                    await self._done_with(rnd, round_, peer, channel,
                                          intact and ended.said_idle, ended.rested)
        return (lost[0] if lost else None), (newer[0] if newer else None)

    async def _done_with(self, rnd: Round, round_: int, peer: bytes, channel: Channel,
                         said_idle: bool, peer_rested: bool) -> None:
        """The round is done with ``channel``: a kept one whose writer said so (its last
        frame, ``_write``) may carry the next round (the opener's by ``kept``, an accepted
        one by its inbound handler); any other, or one left by an error, is closed."""
        if not said_idle or not channel.is_open:
            await close(channel)
        elif self.me < peer:
            await self.kept.release(channel, peer, self.run, round_, peer_rested)
        else:
            rnd.hand_back(peer, channel, peer_rested)

    async def _accepted(self, rnd: Round, round_: int, peer_id: ID) -> Channel:
        """The channel ``peer_id`` opens to us. A peer whose libp2p connection drops while we
        wait (its process died), or that announced meanwhile that it leaves the round (it
        stopped training after this peer had read its announcement), is given up at once
        rather than at the timeouts.

        Raises:
            PeerUnavailable: the peer disconnected, left the round, or did not open a channel
                in time.
        """
        s = self.settings
        deadline = trio.current_time() + s.open_timeout + s.matchmaking.gather_window * 2
        ask_at = trio.current_time() + ASK_IF_LEFT_EVERY
        inbox = rnd.inbound_recv[peer_id.to_bytes()]
        # Behind NATs the peer's dial (through a relay) makes the first connection: only a
        # connection seen and then lost says the peer is gone.
        seen = False
        while trio.current_time() < deadline:
            with trio.move_on_after(0.25):
                return await inbox.receive()
            if self.links.is_connected(peer_id):
                seen = True
            elif seen:
                raise PeerUnavailable(f"{peer_id} disconnected before opening its channel")
            if self.left is not None and trio.current_time() >= ask_at:
                # A channel that came in meanwhile waits in the inbox for the next turn.
                if await self.left(round_, peer_id.to_bytes()):
                    raise PeerUnavailable(f"{peer_id} announced that it leaves round {round_}")
                ask_at = trio.current_time() + ASK_IF_LEFT_EVERY
        raise PeerUnavailable(f"{peer_id} opened no channel in time")

    async def _write(
        self, rnd: Round, round_: int, peer: bytes, channel: Channel, written: list[Send],
        resend: list[Send], ended: _Ended,
    ) -> str | None:
        """Write ``resend`` again, then the member's queue as it fills, noting each frame
        in ``written`` before it goes out (one cut off mid-write may be lost), then, on a
        kept channel, our ``ChannelIdle``; why the channel failed, or None once the queue
        is closed and written."""
        try:
            for send in resend:
                if not ended.rested:
                    await channel.send(send.again())
            async for send in rnd.inboxes[peer]:
                if ended.rested:
                    continue  # the member ended its round: what is still queued is moot
                written.append(send)
                await channel.send(send.buffers())
            if channel.purpose == PURPOSE_KEPT:
                # The queue closes once the round is done here: say so as its last frame,
                # while the reader still drains the member (so credit keeps coming) and
                # within the bound the round gives its writers (then they are cut off).
                await channel.send(encode_idle(ChannelIdle(run=self.run, round=round_)))
                ended.said_idle = True
        except ChannelClosed as exc:
            if ended.closed_is_lost:
                return f"kept channel closed: {exc}"
            # Closed in order (the peer ended its round): nothing was lost, nothing to reopen.
            rnd.fail(peer, f"send failed: {exc}")
        except DandelionError as exc:
            return f"send failed: {exc}"
        rnd.writing.discard(peer)
        rnd.changed.set()
        return None

    async def _read(
        self, rnd: Round, round_: int, peer: bytes, channel: Channel, ended: _Ended
    ) -> str | None:
        # One buffer per link, reused for every frame: the state machine keeps nothing that
        # points into a frame, and a fresh multi-MiB allocation per frame costs page faults.
        buffer = bytearray(channel.receive_max_frame)
        view = memoryview(buffer)
        # Receive rate of this link, for status: the clock starts at the first frame, so
        # only the bytes after it count.
        first = last = 0.0
        received = -1
        kept = channel.purpose == PURPOSE_KEPT
        await rnd.ready.wait()
        try:
            while True:
                try:
                    n = await channel.receive_into(view)
                except ChannelClosed as exc:
                    if ended.closed_is_lost:
                        return f"kept channel closed: {exc}"
                    # Closed in order (the peer ended its round): nothing to reopen.
                    rnd.fail(peer, f"receive failed: {exc}")
                    return None
                except DandelionError as exc:
                    return f"receive failed: {exc}"
                ended.closed_is_lost = False
                if kept and (idle := idle_in(view[:n])) is not None:
                    if idle.run != self.run or idle.round != round_:
                        return f"idle for round {idle.round} in round {round_}"
                    # The member ended its round, as a CLOSE says on a one-round channel.
                    ended.rested = True
                    rnd.rested.add(peer)
                    rnd.fail(peer, "it ended its round")
                    return None
                last = trio.current_time()
                if received < 0:
                    first, received = last, 0
                else:
                    received += n
                if rnd.state.done:
                    continue
                rnd.dispatch(rnd.state.on_frame(peer, view[:n], last))
        finally:
            if received > 0:
                self.reputation.record_link_rate(peer, received, last - first)


def _only_cancelled(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return isinstance(exc, trio.Cancelled)


class _Ended:
    """How a channel's round ended, as its reader and writer saw it."""

    __slots__ = ("closed_is_lost", "rested", "said_idle")

    def __init__(self, closed_is_lost: bool) -> None:
        self.closed_is_lost = closed_is_lost
        """A close now is a loss (a kept channel the member has not spoken on yet)."""
        self.rested = False
        """The member sent its ``ChannelIdle``: it is done with the round on this channel."""
        self.said_idle = False
        """We sent ours, after everything our round still had queued for the member."""
