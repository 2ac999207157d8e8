"""Attacks on leases and receipts by peers whose identities cost nothing: hoarding the free
chunks from one network, receipts for chunks never downloaded, inflated sample counts.
Real libp2p hosts on loopback; the network split (loopback peers all share 127.0.0.0/24) is
shown on the lease desk itself with two documentation networks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from libp2p.peer.id import ID

from dandelion_p2p.dataset.chunks import chunk_hash
from dandelion_p2p.dataset.deliveries import DeliveryLog
from dandelion_p2p.dataset.lease_protocol import LeaseDesk, receipt_for
from dandelion_p2p.dataset.leases import LeaseBook
from dandelion_p2p.dataset.manifest import Manifest
from dandelion_p2p.dataset.messages import (
    DATASET,
    LEASE_PROTOCOL,
    MAX_REPLY,
    Complete,
    CompleteAck,
    LeaseGrant,
    LeaseRequest,
)
from dandelion_p2p.dataset.server import DatasetServer
from dandelion_p2p.dataset.transfer import fetch_chunk
from dandelion_p2p.errors import ProtocolViolation, RemoteRejected
from dandelion_p2p.identity import Identity
from dandelion_p2p.net.dht.messages import PeerRef
from dandelion_p2p.net.node import SwarmNode
from dandelion_p2p.net.streams import request
from dandelion_p2p.runconfig.publication import derive_run_id
from dandelion_p2p.runconfig.schema import DatasetConfig
from dandelion_p2p.wire import Message, RejectCode
from tests.dataset.helpers import dataset_client, packed_dataset
from tests.swarm import public_settings, running_node, swarm

HOSTILE_NETWORK = "203.0.113.0/24"
HONEST_NETWORK = "198.51.100.0/24"


@dataclass
class Setup:
    owner: SwarmNode
    server: DatasetServer
    manifest: Manifest
    run: str
    stack: AsyncExitStack

    async def stranger(self) -> SwarmNode:
        """A fresh identity on its own host, as an attacker makes a thousand a second."""
        boot = (self.owner.full_addrs()[0],)
        return await self.stack.enter_async_context(
            running_node(public_settings(bootstrap=boot)))

    async def ask(self, node: SwarmNode, msg: Message) -> Message:
        return await request(node.host, self.owner.peer_id, LEASE_PROTOCOL, msg, DATASET,
                             max_reply=MAX_REPLY, timeout=10.0)


@asynccontextmanager
async def hostile_setup(tmp_path: Path, *, per_network: int = 8) -> AsyncIterator[Setup]:
    async with swarm(1) as nodes, AsyncExitStack() as stack:
        owner = nodes[0]
        data_dir, manifest = packed_dataset(tmp_path, owner.identity, images=16)
        run = derive_run_id(owner.identity.peer_id_bytes, "tiny")
        book = LeaseBook(tmp_path / "leases.sqlite", manifest, run)
        server = DatasetServer(
            run, manifest, data_dir, book, DatasetConfig(lease_seconds=60, max_leases_per_peer=2),
            host=owner.host, records=owner.records, scores=owner,
            max_leases_per_network=per_network,
        )
        server.install()
        try:
            yield Setup(owner, server, manifest, run, stack)
        finally:
            book.close()


async def _code(coro: object) -> int:
    try:
        await coro  # type: ignore[misc]
    except RemoteRejected as exc:
        return exc.code
    raise AssertionError("not rejected")


def _hoard(desk: LeaseDesk, network: str, identities: int, run: str) -> dict[str, int]:
    """Fresh identities of ``network`` ask for leases until refused: what they got."""
    got = {"granted": 0, "refused": 0, "no_lease": 0}
    for _ in range(identities):
        peer = Identity.generate().peer_id_bytes
        for _ in range(2):
            try:
                reply = desk.answer(peer, LeaseRequest(run=run), 0.0, network)
            except ProtocolViolation:
                got["refused"] += 1
                continue
            got["granted" if isinstance(reply, LeaseGrant) else "no_lease"] += 1
    return got


def test_one_network_hoarding_leases_does_not_starve_another(tmp_path: Path) -> None:
    owner = Identity.generate()
    _, manifest = packed_dataset(tmp_path, owner, images=16)
    run = derive_run_id(owner.peer_id_bytes, "tiny")
    settings = DatasetConfig(lease_seconds=60, max_leases_per_peer=2)
    outcomes: dict[str, object] = {"chunks": len(manifest.chunks)}
    for label, per_network in (("no network limit", 10**6), ("network limit 4", 4)):
        book = LeaseBook(tmp_path / f"{per_network}.sqlite", manifest, run)
        try:
            desk = LeaseDesk(run, book, settings, max_leases_per_network=per_network)
            hoarded = _hoard(desk, HOSTILE_NETWORK, 10, run)
            newcomer = desk.answer(Identity.generate().peer_id_bytes, LeaseRequest(run=run),
                                   0.0, HONEST_NETWORK)
            outcomes[label] = {**hoarded, "newcomer": type(newcomer).__name__}
        finally:
            book.close()
    print("\nlease hoarding by 10 identities of one network:", outcomes)
    unlimited = outcomes["no network limit"]
    limited = outcomes["network limit 4"]
    assert isinstance(unlimited, dict) and isinstance(limited, dict)
    assert unlimited["newcomer"] == "NoLease", f"the attack no longer starves: {outcomes}"
    assert limited["granted"] == 4 and limited["refused"] == 16, outcomes
    assert limited["newcomer"] == "LeaseGrant", f"the newcomer was starved: {outcomes}"


async def test_strangers_on_one_network_hold_no_more_than_its_share(tmp_path: Path) -> None:
    async with hostile_setup(tmp_path, per_network=3) as s:
        granted = refused = 0
        for _ in range(6):
            node = await s.stranger()
            for _ in range(2):
                try:
                    reply = await s.ask(node, LeaseRequest(run=s.run))
                except RemoteRejected as exc:
                    assert exc.code == RejectCode.RATE_LIMITED, exc
                    refused += 1
                    continue
                granted += isinstance(reply, LeaseGrant)
        status = s.server.book.status(0.0)
        figures = {"chunks": len(s.manifest.chunks), "granted": granted, "refused": refused,
                   "active_leases": status["active_leases"]}
        print("\n6 loopback identities asking twice each:", figures)
        assert granted == 3 and refused == 9, figures


async def test_receipts_count_only_for_chunks_delivered_and_samples_in_the_manifest(
    tmp_path: Path,
) -> None:
    async with hostile_setup(tmp_path) as s:
        cheat = await s.stranger()
        sign = cheat.identity.sign
        me = cheat.identity.peer_id_bytes
        grants = [await s.ask(cheat, LeaseRequest(run=s.run)) for _ in range(2)]
        assert all(isinstance(g, LeaseGrant) for g in grants)
        codes: list[int] = []
        for i in range(100):
            grant = grants[i % 2]
            assert isinstance(grant, LeaseGrant)
            codes.append(await _code(s.ask(cheat, Complete(receipt=receipt_for(grant, me, sign)))))
        completed_without_download = s.server.book.completed(0)
        violations = s.owner.violations.get(ID(me).to_base58(), 0)
        banned = s.owner.is_banned(ID(me))

        # Another fresh identity downloads its chunk, then claims far more samples than the
        # chunk holds.
        inflater = await s.stranger()
        grant = await s.ask(inflater, LeaseRequest(run=s.run))
        assert isinstance(grant, LeaseGrant)
        data = await fetch_chunk(inflater.host, s.owner.peer_id, grant.chunk)
        assert chunk_hash(data) == grant.chunk
        inflated = receipt_for(grant, inflater.identity.peer_id_bytes, inflater.identity.sign,
                               samples=2**31 - 1)
        inflated_code = await _code(s.ask(inflater, Complete(receipt=inflated)))
        stored_samples = s.server.book.db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0]

        honest_node = await s.stranger()
        server_ref = PeerRef(peer_id=s.owner.identity.peer_id_bytes,
                             addrs=tuple(s.owner.public_addrs()))
        honest = dataset_client(honest_node, s.run, tmp_path / "cache-honest",
                                servers=[server_ref])
        lease = await honest.lease()
        assert chunk_hash(await honest.fetch(lease.chunk)) == lease.chunk
        ack = await honest.complete(lease)
        figures = {
            "receipts_without_download": len(codes),
            "refused_as_undelivered": codes.count(RejectCode.UNEXPECTED),
            "refused_as_banned": codes.count(RejectCode.FORBIDDEN),
            "completed_by_them": completed_without_download,
            "violations_scored": violations,
            "receipt_cheat_banned": banned,
            "inflated_samples": inflated.samples,
            "chunk_samples": grant.samples,
            "inflated_samples_code": inflated_code,
            "receipts_stored_after_inflated": stored_samples,
            "honest_completed": ack.completed,
            "server_deliveries": len(s.server.deliveries),
        }
        print("\nreceipts without a delivery, and inflated:", figures)
        # Refused as undelivered until the score book bans the peer, then refused unread.
        assert codes[0] == RejectCode.UNEXPECTED, figures
        assert set(codes) <= {RejectCode.UNEXPECTED, RejectCode.FORBIDDEN}, figures
        assert banned, figures
        assert completed_without_download == 0, figures
        assert violations >= 1, figures
        assert inflated_code == RejectCode.INVALID_FIELD and stored_samples == 0, figures
        assert isinstance(ack, CompleteAck) and ack.completed == 1, figures


def test_the_delivery_log_is_bounded_per_peer_and_in_total() -> None:
    log = DeliveryLog(max_per_peer=3, max_total=5)
    peers = [Identity.generate().peer_id_bytes for _ in range(3)]
    for peer in peers:
        for n in range(10):
            log.record(peer, f"{n:064x}")
    figures = {"entries": len(log), "per_peer": [log.held_for(p) for p in peers]}
    print("\ndelivery log after 3 peers x 10 chunks:", figures)
    assert len(log) == 5 and all(n <= 3 for n in figures["per_peer"]), figures  # type: ignore[union-attr]
    assert log.delivered(peers[-1], f"{9:064x}") and not log.delivered(peers[0], f"{0:064x}")
