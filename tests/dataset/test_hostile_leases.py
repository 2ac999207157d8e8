"""Attacks on leases and receipts by peers whose identities cost nothing: hoarding the free
chunks from one network, receipts without the chunk's bytes, inflated sample counts; and an
honest peer whose chunk came from another holder completing its lease without the server.
Real libp2p hosts on loopback; the network split is shown on the lease desk itself with two
documentation networks, and over real hosts listening in two loopback networks that the server
dials (a peer's own dial leaves from 127.0.0.1, so every loopback dialler shares 127.0.0.0/24)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from dandelion_p2p.dataset.chunk_protocol import ChunkSource
from dandelion_p2p.dataset.chunks import ChunkDir, chunk_hash, possession_proof
from dandelion_p2p.dataset.lease_protocol import LeaseDesk, receipt_for
from dandelion_p2p.dataset.leases import LeaseBook
from dandelion_p2p.dataset.manifest import Manifest
from dandelion_p2p.dataset.messages import (
    CHUNK_PROTOCOL,
    DATASET,
    LEASE_PROTOCOL,
    MAX_REPLY,
    POSSESSION_BYTES,
    Complete,
    CompleteAck,
    LeaseGrant,
    LeaseRequest,
    Receipt,
)
from dandelion_p2p.dataset.server import DatasetServer, violation_sink
from dandelion_p2p.dataset.transfer import fetch_chunk, serve_chunks
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

    async def dialled_stranger(self, listen: str) -> SwarmNode:
        """A fresh identity listening at ``listen`` and dialled by the server, so the server
        sees the connection come from ``listen``'s network, not the loopback dial source."""
        node = await self.stack.enter_async_context(running_node(public_settings(listen=(listen,))))
        await self.owner.host.connect(
            PeerInfo(node.host.get_id(), [Multiaddr(a) for a in node.host.get_addrs()]))
        return node

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


async def ask_twice_each(s: Setup, nodes: list[SwarmNode]) -> tuple[int, int]:
    """Each node asks for a lease twice; (granted, refused). Every refusal must be
    ``RATE_LIMITED``."""
    granted = refused = 0
    for node in nodes:
        for _ in range(2):
            try:
                reply = await s.ask(node, LeaseRequest(run=s.run))
            except RemoteRejected as exc:
                assert exc.code == RejectCode.RATE_LIMITED, exc
                refused += 1
                continue
            granted += isinstance(reply, LeaseGrant)
    return granted, refused


async def test_strangers_on_one_network_hold_no_more_than_its_share(tmp_path: Path) -> None:
    async with hostile_setup(tmp_path, per_network=3) as s:
        granted, refused = await ask_twice_each(s, [await s.stranger() for _ in range(6)])
        status = s.server.book.status(0.0)
        figures = {"chunks": len(s.manifest.chunks), "granted": granted, "refused": refused,
                   "active_leases": status["active_leases"]}
        print("\n6 loopback identities asking twice each:", figures)
        assert granted == 3 and refused == 9, figures


async def test_a_newcomer_from_another_network_leases_past_a_hoarding_network(
    tmp_path: Path,
) -> None:
    async with hostile_setup(tmp_path, per_network=3) as s:
        hoarders = [await s.dialled_stranger(f"/ip4/127.0.9.{i + 1}/tcp/0") for i in range(6)]
        hoarder_networks = {s.server._network_of(node.peer_id) for node in hoarders}
        granted, refused = await ask_twice_each(s, hoarders)
        newcomer = await s.dialled_stranger("/ip4/127.0.1.5/tcp/0")
        newcomer_network = s.server._network_of(newcomer.peer_id)
        reply = await s.ask(newcomer, LeaseRequest(run=s.run))
        figures = {"chunks": len(s.manifest.chunks), "hoarder_networks": sorted(hoarder_networks),
                   "granted": granted, "refused": refused, "newcomer_network": newcomer_network,
                   "newcomer": type(reply).__name__,
                   "active_leases": s.server.book.status(0.0)["active_leases"]}
        print("\n6 identities of 127.0.9.0/24 asking twice each, then one of 127.0.1.0/24:",
              figures)
        assert hoarder_networks == {"127.0.9.0/24"}, figures
        assert newcomer_network == "127.0.1.0/24", figures
        assert granted == 3 and refused == 9, figures
        assert isinstance(reply, LeaseGrant), f"the newcomer was starved: {figures}"


def _unproven(receipt: Receipt, possession: bytes, sign: Callable[[bytes], bytes]) -> Receipt:
    """``receipt`` re-signed with another possession proof, past the local check (a hostile
    client's encoder checks nothing)."""
    forged = replace(receipt)
    object.__setattr__(forged, "possession", possession)
    object.__setattr__(forged, "signature", sign(forged.signed_bytes()))
    return forged


async def test_a_receipt_counts_only_with_proof_of_the_bytes_and_the_manifests_samples(
    tmp_path: Path,
) -> None:
    async with hostile_setup(tmp_path) as s:
        # A fresh identity leases two chunks, downloads nothing, and hands in 100 receipts
        # with guessed proofs.
        cheat = await s.stranger()
        sign = cheat.identity.sign
        me = cheat.identity.peer_id_bytes
        grants = [await s.ask(cheat, LeaseRequest(run=s.run)) for _ in range(2)]
        assert all(isinstance(g, LeaseGrant) for g in grants)
        codes: list[int] = []
        for i in range(100):
            grant = grants[i % 2]
            assert isinstance(grant, LeaseGrant)
            guess = receipt_for(grant, me, sign, secrets.token_bytes(POSSESSION_BYTES))
            codes.append(await _code(s.ask(cheat, Complete(receipt=guess))))
        completed_without_bytes = s.server.book.completed(0)
        violations = s.owner.violations.get(ID(me).to_base58(), 0)
        banned = s.owner.is_banned(ID(me))

        # Another one sends no proof at all (an empty field), and a proof of other bytes.
        empty_handed = await s.stranger()
        grant = await s.ask(empty_handed, LeaseRequest(run=s.run))
        assert isinstance(grant, LeaseGrant)
        honest_form = receipt_for(grant, empty_handed.identity.peer_id_bytes,
                                  empty_handed.identity.sign, bytes(POSSESSION_BYTES))
        missing = _unproven(honest_form, b"", empty_handed.identity.sign)
        missing_code = await _code(s.ask(empty_handed, Complete(receipt=missing)))
        other_bytes = possession_proof(grant.nonce, b"not the chunk")
        wrong = receipt_for(grant, empty_handed.identity.peer_id_bytes,
                            empty_handed.identity.sign, other_bytes)
        wrong_code = await _code(s.ask(empty_handed, Complete(receipt=wrong)))
        empty_handed_violations = s.owner.violations.get(empty_handed.peer_id.to_base58(), 0)

        # Another fresh identity downloads its chunk, proves it, then claims far more
        # samples than the chunk holds.
        inflater = await s.stranger()
        grant = await s.ask(inflater, LeaseRequest(run=s.run))
        assert isinstance(grant, LeaseGrant)
        data = await fetch_chunk(inflater.host, s.owner.peer_id, grant.chunk)
        assert chunk_hash(data) == grant.chunk
        inflated = receipt_for(grant, inflater.identity.peer_id_bytes, inflater.identity.sign,
                               possession_proof(grant.nonce, data), samples=2**31 - 1)
        inflated_code = await _code(s.ask(inflater, Complete(receipt=inflated)))
        stored = s.server.book.db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0]

        honest_node = await s.stranger()
        server_ref = PeerRef(peer_id=s.owner.identity.peer_id_bytes,
                             addrs=tuple(s.owner.public_addrs()))
        honest = dataset_client(honest_node, s.run, tmp_path / "cache-honest",
                                servers=[server_ref])
        lease = await honest.lease()
        assert chunk_hash(await honest.fetch(lease.chunk)) == lease.chunk
        ack = await honest.complete(lease)
        figures = {
            "receipts_without_bytes": len(codes),
            "refused_wrong_proof": codes.count(RejectCode.INVALID_FIELD),
            "refused_as_banned": codes.count(RejectCode.FORBIDDEN),
            "completed_by_them": completed_without_bytes,
            "violations_scored": violations,
            "receipt_cheat_banned": banned,
            "missing_proof_code": missing_code,
            "proof_of_other_bytes_code": wrong_code,
            "their_violations_scored": empty_handed_violations,
            "inflated_samples": inflated.samples,
            "chunk_samples": grant.samples,
            "inflated_samples_code": inflated_code,
            "receipts_stored_before_honest": stored,
            "honest_completed": ack.completed,
        }
        print("\nreceipts without the bytes, and inflated:", figures)
        # Refused for a wrong proof until the score book bans the peer, then refused unread.
        assert codes[0] == RejectCode.INVALID_FIELD, figures
        assert set(codes) <= {RejectCode.INVALID_FIELD, RejectCode.FORBIDDEN}, figures
        assert banned and violations >= 1, figures
        assert completed_without_bytes == 0, figures
        assert missing_code == RejectCode.INVALID_FIELD, figures
        assert wrong_code in (RejectCode.INVALID_FIELD, RejectCode.FORBIDDEN), figures
        assert empty_handed_violations >= 1, figures
        assert inflated_code == RejectCode.INVALID_FIELD and stored == 0, figures
        assert isinstance(ack, CompleteAck) and ack.completed == 1, figures


class ServedBytes:
    """A chunk source that counts the bytes it hands to the chunk protocol."""

    def __init__(self, source: ChunkSource) -> None:
        self.source = source
        self.total = 0

    def __call__(self, name: str) -> Path | bytes | None:
        held = self.source(name)
        if isinstance(held, Path):
            self.total += held.stat().st_size
        elif held is not None:
            self.total += len(held)
        return held


async def test_a_chunk_from_another_holder_completes_the_lease_without_the_server(
    tmp_path: Path,
) -> None:
    async with swarm(3) as nodes:
        owner, holder_node, trainer_node = nodes
        data_dir, manifest = packed_dataset(tmp_path, owner.identity, images=16)
        run = derive_run_id(owner.identity.peer_id_bytes, "tiny")
        book = LeaseBook(tmp_path / "leases.sqlite", manifest, run)
        try:
            server = DatasetServer(
                run, manifest, data_dir, book,
                DatasetConfig(lease_seconds=60, max_leases_per_peer=2),
                host=owner.host, records=owner.records, scores=owner,
            )
            server.install(chunks=False)
            served = ServedBytes(server.source)
            owner.host.set_stream_handler(
                TProtocol(CHUNK_PROTOCOL),
                serve_chunks(served, on_violation=violation_sink(owner), refuse=owner.is_banned),
            )
            assert await server.announce() >= 1

            # A holder caches every chunk (from the server) and announces its copies.
            holder = dataset_client(holder_node, run, tmp_path / "cache-holder")
            holder.install()
            for entry in manifest.chunks:
                await holder.fetch(entry.hash, expected_size=entry.size)
            served_to_holder = served.total

            trainer = dataset_client(trainer_node, run, tmp_path / "cache-trainer")
            trainer.install()
            lease = await trainer.lease()
            assert await trainer.holders(lease.chunk) == [holder_node.identity.peer_id_bytes]
            data = await trainer.fetch(lease.chunk, expected_size=lease.size)
            ack = await trainer.complete(lease)
            figures = {
                "chunks": len(manifest.chunks),
                "dataset_bytes": manifest.size,
                "served_to_holder": served_to_holder,
                "served_for_the_lease": served.total - served_to_holder,
                "chunk_bytes": len(data),
                "completed": ack.completed,
                "trainer_violations": owner.violations.get(trainer_node.peer_id.to_base58(), 0),
            }
            print("\nlease completed from a holder's copy:", figures)
            assert served_to_holder == manifest.size, figures
            assert figures["served_for_the_lease"] == 0, figures
            assert ack.completed == 1 and figures["trainer_violations"] == 0, figures
        finally:
            book.close()


def test_a_resent_receipt_is_acknowledged_without_hashing_the_chunk_again(
    tmp_path: Path,
) -> None:
    owner, peer = Identity.generate(), Identity.generate()
    data_dir, manifest = packed_dataset(tmp_path, owner, images=16)
    run = derive_run_id(owner.peer_id_bytes, "tiny")
    chunk_files = ChunkDir(data_dir)
    reads: list[str] = []

    def chunk_path(name: str) -> Path:
        reads.append(name)
        return chunk_files.path_of(name)

    book = LeaseBook(tmp_path / "leases.sqlite", manifest, run)
    try:
        desk = LeaseDesk(run, book, DatasetConfig(lease_seconds=60, max_leases_per_peer=2),
                         chunk_path=chunk_path)
        grant = desk.answer(peer.peer_id_bytes, LeaseRequest(run=run), 0.0)
        assert isinstance(grant, LeaseGrant)
        proof = possession_proof(grant.nonce, chunk_files.path_of(grant.chunk).read_bytes())
        receipt = receipt_for(grant, peer.peer_id_bytes, peer.sign, proof)
        acks = [desk.answer(peer.peer_id_bytes, Complete(receipt=receipt), 1.0)
                for _ in range(50)]
        figures = {"receipts_sent": len(acks), "chunk_reads": len(reads),
                   "receipts_taken": desk.receipts_taken}
        print("\nthe same proven receipt sent 50 times:", figures)
        assert all(isinstance(a, CompleteAck) and a.completed == 1 for a in acks), figures
        assert figures["chunk_reads"] == 1 and figures["receipts_taken"] == 1, figures
    finally:
        book.close()
