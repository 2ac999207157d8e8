"""The DHT service: answers queries (server mode) and runs lookups, puts and gets over libp2p.

The protocol logic lives in the sans-IO modules beside this one (routing table, lookup state
machine, record validation and store); this module only moves their messages over streams.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from dandelion_p2p.errors import (
    DandelionError,
    PeerUnavailable,
    ProtocolViolation,
    RemoteRejected,
)
from dandelion_p2p.net.addrs import ip_of
from dandelion_p2p.net.dht.landings import Landings
from dandelion_p2p.net.dht.lookup import Lookup
from dandelion_p2p.net.dht.messages import (
    DHT,
    MAX_FRAME,
    MAX_PEERS_PER_REPLY,
    MAX_RECORDS_PER_REPLY,
    PROTOCOL_ID,
    PROTOCOL_ID_ONE_PER_STREAM,
    FindNode,
    GetRecords,
    Nodes,
    PeerRef,
    PutAck,
    PutRecord,
    Records,
    SignedRecord,
)
from dandelion_p2p.net.dht.records import (
    LOCAL_SOURCE,
    READ_BACK_NETWORK,
    LocalRecordStore,
    RecordValidator,
    Source,
    StoreLimits,
    diverse_selection,
    merge_newest,
    routing_key,
    sign_record,
)
from dandelion_p2p.net.dht.routing import RoutingTable, distance
from dandelion_p2p.net.dialer import Dialer
from dandelion_p2p.net.origin import peer_ip, peer_network
from dandelion_p2p.net.ports import Signer
from dandelion_p2p.net.request_streams import KEEP_ALIVE, RequestStreams
from dandelion_p2p.net.streams import NOT_A_FAULT, ViolationSink, serve_requests
from dandelion_p2p.networks import public_network_of
from dandelion_p2p.wire import Message, RejectCode, encode

log = logging.getLogger(__name__)


MAX_PENDING_REPAIRS = 64
PREPARED_KEYS = 16
"""Keys whose closest servers ``prepare_put`` keeps at once (the oldest goes first)."""
PREPARED_FRESH = 60.0
"""Seconds a prepared set of closest servers is used for a put; older, the put looks again."""


def now_ms() -> int:
    return int(time.time() * 1000)


# The closest servers that must all have returned an owner-only record before a get stops
# early. The closest, not any: a farther replica may still hold a version an update missed.
GET_QUORUM = 3
# Room for the msgpack array headers around the records, generously.
REPLY_MARGIN = 64


def encoded_size(record: SignedRecord) -> int:
    return len(encode(record))


class DHTNode:
    """One peer's DHT: a routing table, a record store, and the RPCs between them.

    In server mode the node answers queries and is added to other peers' routing tables; in
    client mode (peers behind NAT) it only asks.
    """

    def __init__(
        self,
        host: IHost,
        signer: Signer,
        dialer: Dialer,
        validator: RecordValidator,
        *,
        server: bool,
        self_addrs: Callable[[], tuple[str, ...]] = tuple,
        k: int = 20,
        replicas: int = 8,
        alpha: int = 4,
        rpc_timeout: float = 5.0,
        on_violation: ViolationSink | None = None,
        is_banned: Callable[[ID], bool] | None = None,
        store_limits: StoreLimits | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.host = host
        self.signer = signer
        self.local_id = signer.peer_id_bytes
        self.dialer = dialer
        self.validator = validator
        self.server = server
        self.self_addrs = self_addrs
        self.replicas = replicas
        self.alpha = alpha
        self.rpc_timeout = rpc_timeout
        self.on_violation = on_violation
        self.is_banned = is_banned or (lambda peer_id: False)
        self.table = RoutingTable(self.local_id, k=k)
        self.streams = RequestStreams(host, (PROTOCOL_ID, PROTOCOL_ID_ONE_PER_STREAM),
                                      reusable=PROTOCOL_ID)
        self.store = LocalRecordStore(store_limits)
        self.landings = Landings()
        self.rng = rng or random.Random()
        # (namespace, key) -> (value, ttl, when last published) for records we keep alive.
        self._published: dict[tuple[str, bytes], tuple[bytes, float, float]] = {}
        self._seq = now_ms()
        self._published_at_size = 0
        # Routing key -> (when found, the closest servers) from ``prepare_put``; in key order
        # of preparing, so the oldest is the first.
        self._prepared: dict[bytes, tuple[float, list[PeerRef]]] = {}
        self._preparing: dict[bytes, trio.Event] = {}
        # Replicas seen holding an older version of a record than a get found elsewhere;
        # ``maintain`` stores the newer one there. Bounded: repairs are a courtesy.
        self._repairs_send, self._repairs = trio.open_memory_channel[tuple[PeerRef, SignedRecord]](
            MAX_PENDING_REPAIRS
        )

    # ---- serving -------------------------------------------------------------------------

    def install(self) -> None:
        if self.server:
            for protocol, keep_alive in ((PROTOCOL_ID, KEEP_ALIVE),
                                         (PROTOCOL_ID_ONE_PER_STREAM, 0.0)):
                self.host.set_stream_handler(TProtocol(protocol), serve_requests(
                    DHT, self._answer, max_request=MAX_FRAME, timeout=self.rpc_timeout,
                    on_violation=self._violation, refuse=self.is_banned,
                    keep_alive=keep_alive))

    def _violation(self, peer_id: ID, code: RejectCode) -> None:
        if self.on_violation is not None:
            self.on_violation(peer_id, code)

    def _closer_refs(self, target: bytes, exclude: bytes) -> tuple[PeerRef, ...]:
        contacts = self.table.nearest(target, min(self.table.k, MAX_PEERS_PER_REPLY), exclude)
        return tuple(c.ref() for c in contacts)

    def _learn_sender(self, peer_id: ID, sender: PeerRef | None) -> None:
        if sender is None:
            return
        if sender.peer_id != peer_id.to_bytes():
            raise ProtocolViolation(RejectCode.FORBIDDEN, "sender is not the connected peer")
        self._remember(sender)

    def _remember(self, ref: PeerRef) -> None:
        """Note in the routing table that ``ref`` answered or asked us."""
        network = self._contact_network(ID(ref.peer_id), ref.addrs)
        self.table.update(ref.peer_id, ref.addrs, trio.current_time(), network)

    def _contact_network(self, peer_id: ID, addrs: tuple[str, ...]) -> str | None:
        """The public network a contact counts for in the routing table: the one we see its
        direct connection come from, else that of the first IP address it is known by (a
        claim, but one we dial: an address that is not the contact's own never answers)."""
        seen = peer_ip(self.host, peer_id, direct_only=True)
        if seen is not None:
            return public_network_of(seen)
        for addr in addrs:
            ip = ip_of(addr)
            if ip is not None:
                return public_network_of(ip)
        return None

    async def _answer(self, peer_id: ID, msg: Message) -> Message:
        if isinstance(msg, FindNode):
            self._learn_sender(peer_id, msg.sender)
            return Nodes(closer=self._closer_refs(msg.target, peer_id.to_bytes()))
        if isinstance(msg, GetRecords):
            self._learn_sender(peer_id, msg.sender)
            closer = self._closer_refs(msg.target, peer_id.to_bytes())
            # A key with many publishers can hold more than one reply carries: the choice
            # takes turns between storing networks, so no expiry claim and no flood from one
            # network crowds out the others.
            records = diverse_selection(
                self.store.entries(msg.target, now_ms()),
                budget=MAX_FRAME - len(encode(Records(records=(), closer=closer))) - REPLY_MARGIN,
                max_count=MAX_RECORDS_PER_REPLY,
                size_of=encoded_size,
                rng=self.rng,
            )
            return Records(records=tuple(records), closer=closer)
        if isinstance(msg, PutRecord):
            self._learn_sender(peer_id, msg.sender)
            t = now_ms()
            self.validator.validate(msg.record, t)
            network = peer_network(self.host, peer_id, direct_only=False)
            self._store_here(msg.record, t, Source(peer=peer_id.to_bytes(), network=network))
            return PutAck(stored=True)
        raise ProtocolViolation(RejectCode.UNKNOWN_TYPE, f"{type(msg).__name__} is not a request")

    # ---- asking --------------------------------------------------------------------------

    def _sender(self) -> PeerRef | None:
        if not self.server:
            return None
        return PeerRef(peer_id=self.local_id, addrs=self.self_addrs()[:16])

    async def _rpc(self, ref: PeerRef, msg: Message) -> Message:
        peer_id = ID(ref.peer_id)
        if self.is_banned(peer_id):
            self.table.remove(ref.peer_id)
            raise PeerUnavailable(f"{peer_id} is banned")
        try:
            await self.dialer.connect(peer_id, ref.addrs)
            reply = await self.streams.request(peer_id, msg, DHT, max_reply=MAX_FRAME,
                                               timeout=self.rpc_timeout)
        except ProtocolViolation as exc:
            self._violation(peer_id, exc.code)
            self.table.remove(ref.peer_id)
            raise
        except RemoteRejected as exc:
            # A refusal an honest server gives (stale write, full store) says nothing bad
            # about it; anything else means it is not a useful contact.
            if exc.code in NOT_A_FAULT:
                self._remember(ref)
            else:
                self.table.remove(ref.peer_id)
            raise
        except DandelionError:
            self.table.remove(ref.peer_id)
            raise
        self._remember(ref)
        return reply

    def _wrong_reply(self, ref: PeerRef, expected: str) -> ProtocolViolation:
        self._violation(ID(ref.peer_id), RejectCode.UNEXPECTED)
        self.table.remove(ref.peer_id)
        return ProtocolViolation(RejectCode.UNEXPECTED, f"answered without {expected}")

    async def _lookup(
        self,
        target: bytes,
        query: Callable[[PeerRef], Awaitable[tuple[PeerRef, ...]]],
        width: int,
        timeout: float | None = None,
        enough: Callable[[Lookup], bool] | None = None,
    ) -> Lookup:
        """Run a lookup; after ``timeout`` (default: three RPC timeouts) it stops with what
        it has, so one stalled peer among the closest delays a lookup by at most that."""
        seeds = [c.ref() for c in self.table.nearest(target, max(width, self.table.k))]
        lookup = Lookup(target, seeds, local_peer_id=self.local_id, width=width, alpha=self.alpha)
        done_send, done_recv = trio.open_memory_channel[None](math.inf)

        async def ask(ref: PeerRef) -> None:
            try:
                closer = await query(ref)
            except DandelionError as exc:
                log.debug("dht query to %s failed: %s", ID(ref.peer_id), exc)
                lookup.on_failure(ref.peer_id)
            else:
                lookup.on_reply(ref.peer_id, closer)
            finally:
                done_send.send_nowait(None)

        with trio.move_on_after(timeout if timeout is not None else self.rpc_timeout * 3):
            async with trio.open_nursery() as nursery:
                while True:
                    for ref in lookup.next_queries():
                        nursery.start_soon(ask, ref)
                    if lookup.finished or lookup.in_flight == 0:
                        break
                    await done_recv.receive()
                    if enough is not None and enough(lookup):
                        break
                nursery.cancel_scope.cancel()
        return lookup

    async def find_closest(
        self, target: bytes, count: int | None = None, *, timeout: float | None = None
    ) -> list[PeerRef]:
        """The ``count`` (default: replication factor) closest DHT servers to ``target``."""
        width = count or self.replicas

        async def query(ref: PeerRef) -> tuple[PeerRef, ...]:
            reply = await self._rpc(ref, FindNode(target=target, sender=self._sender()))
            if not isinstance(reply, Nodes):
                raise self._wrong_reply(ref, "Nodes")
            return reply.closer

        lookup = await self._lookup(target, query, width, timeout)
        return lookup.closest_answered()

    async def bootstrap(self, peers: list[PeerRef]) -> int:
        """Join through known peers; returns how many answered. Fills the routing table."""
        answered = 0

        async def ping(ref: PeerRef) -> None:
            nonlocal answered
            try:
                reply = await self._rpc(
                    ref, FindNode(target=self.table.local_key, sender=self._sender())
                )
            except DandelionError as exc:
                log.info("bootstrap peer %s did not answer: %s", ID(ref.peer_id), exc)
                return
            answered += 1
            if isinstance(reply, Nodes):
                for closer in reply.closer:
                    self._remember(closer)

        async with trio.open_nursery() as nursery:
            for ref in peers:
                nursery.start_soon(ping, ref)
        if answered:
            await self.find_closest(self.table.local_key, self.table.k)
        return answered

    async def get(
        self, namespace: str, key: bytes, *, timeout: float | None = None
    ) -> list[SignedRecord]:
        """Every valid, unexpired record under (namespace, key), newest per publisher.

        Records from the network are validated again here; a peer returning an invalid
        record is reported as a violation and its records are ignored.
        """
        target = routing_key(namespace, key)
        found: list[SignedRecord] = []
        if self.server:
            found.extend(self.store.get(target, now_ms()))

        async def query(ref: PeerRef) -> tuple[PeerRef, ...]:
            reply = await self._rpc(ref, GetRecords(target=target, sender=self._sender()))
            if not isinstance(reply, Records):
                raise self._wrong_reply(ref, "Records")
            t = now_ms()
            checked: list[SignedRecord] = []
            for record in reply.records:
                if record.expires_at_ms <= t:
                    # The server's clock may run a little behind ours: an expired record is
                    # dropped, not held against it.
                    continue
                try:
                    if routing_key(record.namespace, record.key) != target:
                        raise ProtocolViolation(RejectCode.INVALID_FIELD, "record for other key")
                    self.validator.validate(record, t)
                except ProtocolViolation as exc:
                    self._violation(ID(ref.peer_id), exc.code)
                    self.table.remove(ref.peer_id)
                    raise
                checked.append(record)
            # Only a reply whose records all validate counts: one invalid record discredits
            # the records that came before it in the same reply as well.
            found.extend(checked)
            if checked:
                holders.append(ref.peer_id)
                replies.append((ref, checked))
            return reply.closer

        replies: list[tuple[PeerRef, list[SignedRecord]]] = []

        holders: list[bytes] = []
        policy = self.validator.policies.get(namespace)
        # A record only its owner may write is one record, republished to every replica: once
        # GET_QUORUM of them returned it, asking the rest would only find copies of it. Keys
        # many publishers write to are read from all the closest servers.
        quorum = GET_QUORUM if policy is not None and policy.owner_only else None

        def enough(lookup: Lookup) -> bool:
            assert quorum is not None
            closest = lookup.closest_settled(quorum)
            return closest is not None and set(closest) <= set(holders)

        await self._lookup(target, query, self.replicas, timeout,
                           enough=enough if quorum else None)
        t = now_ms()
        newest = [r for r in merge_newest(found) if r.expires_at_ms > t]
        self._queue_repairs(replies, newest)
        return newest

    def _queue_repairs(
        self, replies: list[tuple[PeerRef, list[SignedRecord]]], newest: list[SignedRecord]
    ) -> None:
        """Read repair: a replica that answered with an older version of a publisher's record
        than another replica is handed the newer one, so an update that missed some replicas
        (a timeout during its put) reaches them at the next read."""
        latest = {r.publisher: r for r in newest}
        read_back = Source(peer=b"read-back", network=READ_BACK_NETWORK)
        if self.server:
            for record in newest:
                with contextlib.suppress(ProtocolViolation):
                    # Refused when not newer or over the read-back share: fine.
                    self._store_here(record, now_ms(), read_back)
        for ref, records in replies:
            for record in records:
                current = latest.get(record.publisher)
                if current is not None and current.seq > record.seq:
                    try:
                        self._repairs_send.send_nowait((ref, current))
                    except trio.WouldBlock:
                        return

    async def _repair_loop(self) -> None:
        async for ref, record in self._repairs:
            with trio.move_on_after(self.rpc_timeout):
                try:
                    await self._rpc(ref, PutRecord(record=record, sender=self._sender()))
                except DandelionError as exc:
                    log.debug("read repair at %s failed: %s", ID(ref.peer_id), exc)

    async def put(
        self,
        namespace: str,
        key: bytes,
        value: bytes,
        ttl: float,
        *,
        keep: bool = True,
        timeout: float | None = None,
    ) -> int:
        """Sign and store a record on the closest servers; returns how many stored it.

        With ``keep`` the record is republished before it expires until ``unpublish``.
        ``timeout`` bounds the lookup and, again, the stores.
        """
        self._seq = max(self._seq + 1, now_ms())
        expires = now_ms() + int(ttl * 1000)
        record = sign_record(self.signer, namespace, key, value, self._seq, expires)
        if keep:
            self._published[(namespace, key)] = (value, ttl, trio.current_time())
            self._published_at_size = len(self.table)
        return await self.put_record(record, timeout=timeout)

    def unpublish(self, namespace: str, key: bytes) -> None:
        self._published.pop((namespace, key), None)

    def held(self, namespace: str, key: bytes) -> list[SignedRecord] | None:
        """What this node's store holds under the key when it is among the ``replicas``
        servers closest to it that it knows: the publishers' puts store here too, so a
        reader that polls the key learns of each as it lands, for no RPC. None otherwise."""
        if not self.server:
            return None
        target = routing_key(namespace, key)
        nearest = self.table.nearest(target, self.replicas)
        if (len(nearest) >= self.replicas
                and distance(nearest[-1].key, target) < distance(self.table.local_key, target)):
            return None
        return self.store.get(target, now_ms())

    def landing(self, namespace: str, key: bytes) -> trio.Event:
        """Set when the next record under (namespace, key) is stored here (``held``)."""
        return self.landings.event(routing_key(namespace, key))

    def _store_here(self, record: SignedRecord, now: int, source: Source = LOCAL_SOURCE) -> None:
        """``store.put``, waking the readers of the key unless the record was held already."""
        if self.store.put(record, now, source):
            self.landings.landed(routing_key(record.namespace, record.key))

    async def prepare_put(
        self, namespace: str, key: bytes, *, timeout: float | None = None
    ) -> None:
        """Find the servers closest to (namespace, key) now, so that a put under it within
        ``PREPARED_FRESH`` seconds stores there at once instead of looking them up first (a
        round's announcement, whose key is known a round ahead)."""
        target = routing_key(namespace, key)
        if target in self._preparing:
            return
        self._preparing[target] = found = trio.Event()
        try:
            closest = await self.find_closest(target, timeout=timeout)
            if closest:
                self._prepared.pop(target, None)
                while len(self._prepared) >= PREPARED_KEYS:
                    del self._prepared[next(iter(self._prepared))]
                self._prepared[target] = (trio.current_time(), closest)
        finally:
            del self._preparing[target]
            found.set()

    def _prepared_for(self, target: bytes) -> list[PeerRef]:
        found_at, closest = self._prepared.get(target, (-math.inf, []))
        return closest if trio.current_time() - found_at <= PREPARED_FRESH else []

    async def put_record(self, record: SignedRecord, *, timeout: float | None = None) -> int:
        target = routing_key(record.namespace, record.key)
        stored = 0
        if self.server:
            try:
                self._store_here(record, now_ms())
                stored += 1
            except ProtocolViolation as exc:
                log.debug("local store refused own record: %s", exc)
        # A lookup and the stores, each within ``timeout``: twice that in all, whichever
        # way the servers are found.
        deadline = trio.current_time() + 2 * timeout if timeout is not None else math.inf

        def bound() -> float | None:
            if timeout is None:
                return None
            return max(0.0, min(timeout, deadline - trio.current_time()))

        if (preparing := self._preparing.get(target)) is not None:
            # Its closest servers are being found already: looking again would only double
            # the work.
            with trio.move_on_after(timeout if timeout is not None else math.inf):
                await preparing.wait()
        prepared = self._prepared_for(target)
        if prepared:
            stored_there = await self._store_at(record, prepared, bound())
            if stored_there:
                return stored + stored_there
            # Every server found then failed: they may be gone, look again (and forget them).
            self._prepared.pop(target, None)
        closest = await self.find_closest(target, timeout=bound())
        return stored + await self._store_at(record, closest, bound())

    async def _store_at(
        self, record: SignedRecord, servers: list[PeerRef], timeout: float | None
    ) -> int:
        """Store ``record`` on the first ``replicas`` of ``servers``; returns how many did."""
        stored = 0

        async def store_at(ref: PeerRef) -> None:
            nonlocal stored
            try:
                reply = await self._rpc(ref, PutRecord(record=record, sender=self._sender()))
                if not isinstance(reply, PutAck):
                    raise self._wrong_reply(ref, "PutAck")
                stored += 1
            except DandelionError as exc:
                log.debug("put to %s failed: %s", ID(ref.peer_id), exc)

        with trio.move_on_after(timeout if timeout is not None else math.inf):
            async with trio.open_nursery() as nursery:
                for ref in servers[: self.replicas]:
                    nursery.start_soon(store_at, ref)
        return stored

    # ---- upkeep --------------------------------------------------------------------------

    async def republish(self) -> None:
        """Store every record we keep alive again, on the peers now closest to it."""
        self._published_at_size = len(self.table)
        for (namespace, key), (value, ttl, _) in list(self._published.items()):
            try:
                await self.put(namespace, key, value, ttl)
            except DandelionError as exc:
                log.warning("republishing a %s record failed: %s", namespace, exc)

    def _table_grew(self) -> bool:
        """Whether enough peers joined since our last publication that closer ones may exist.

        Records published while the network was small sit on whoever was closest then;
        Kademlia moves them as the network grows, and republishing ours is how we do it.
        """
        size, before = len(self.table), self._published_at_size
        return size >= before + 2 and size >= before * 1.25

    async def maintain(self, *, interval: float = 5.0, refresh_every: float = 60.0) -> None:
        """Runs forever: drops expired records, republishes ours when the network grew or
        half their lifetime passed, refreshes the routing table, repairs stale replicas,
        closes request streams kept too long."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._repair_loop)
            nursery.start_soon(self.streams.run)
            await self._upkeep(interval, refresh_every)

    async def _upkeep(self, interval: float, refresh_every: float) -> None:
        last_refresh = trio.current_time()
        while True:
            await trio.sleep(interval)
            self.store.purge(now_ms())
            now = trio.current_time()
            due = any(now - at >= ttl / 2 for _, ttl, at in self._published.values())
            if due or self._table_grew():
                await self.republish()
            if now - last_refresh >= refresh_every and self.table.stale_buckets(now, refresh_every):
                last_refresh = now
                try:
                    await self.find_closest(self.table.local_key, self.table.k)
                except DandelionError as exc:
                    log.debug("routing refresh failed: %s", exc)
