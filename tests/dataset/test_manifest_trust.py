"""Clients follow the manifest the run config names: a hostile second server gets nowhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from dandelion_p2p.dataset.manifest import load_manifest, signed_digest, signed_document
from dandelion_p2p.dataset.messages import LeaseGrant
from dandelion_p2p.dataset.pack import pack
from dandelion_p2p.errors import PeerUnavailable
from dandelion_p2p.net.dht.messages import PeerRef
from dandelion_p2p.net.node import SwarmNode
from dandelion_p2p.runconfig.publication import derive_run_id
from dandelion_p2p.runconfig.schema import DatasetConfig
from tests.dataset.helpers import dataset_client, image_folder, packed_dataset, serve_dataset
from tests.swarm import swarm


def _ref(node: SwarmNode) -> PeerRef:
    return PeerRef(peer_id=node.identity.peer_id_bytes, addrs=tuple(node.public_addrs()))


async def test_a_hostile_server_of_the_same_run_is_skipped_and_its_grants_refused(
    tmp_path: Path,
) -> None:
    async with swarm(4) as (owner, hostile, peer, other):
        run = derive_run_id(owner.identity.peer_id_bytes, "tiny")
        honest_dir, honest_manifest = packed_dataset(tmp_path / "honest", owner.identity)
        # The hostile peer packs its own pictures, signs them with its key, and announces
        # itself as a dataset server of the owner's run.
        hostile_dir = tmp_path / "hostile"
        pack(image_folder(tmp_path / "hostile-src", 8, first_seed=100), hostile_dir,
             hostile.identity, chunk_bytes=64 * 1024)
        servers = [
            await serve_dataset(node, run, load_manifest(data_dir), data_dir,
                                tmp_path / f"leases-{i}.sqlite",
                                DatasetConfig(lease_seconds=30, max_leases_per_peer=8))
            for i, (node, data_dir) in enumerate(((owner, honest_dir), (hostile, hostile_dir)))
        ]
        books = [server.book for server in servers]
        honest_server, hostile_server = servers
        digest = signed_digest(signed_document(honest_dir))
        assert honest_server.signed_manifest_digest == digest
        try:
            client = dataset_client(peer, run, tmp_path / "cache", expected_manifest=digest,
                                    announce_holdings=False)
            discovered = await client.servers(refresh=True)
            assert hostile.identity.peer_id_bytes in discovered  # before the manifest is known
            manifest = await client.verified_manifest()
            assert manifest == honest_manifest
            assert await client.servers(refresh=True) == [owner.identity.peer_id_bytes]
            entries = {(c.hash, c.samples, c.size) for c in honest_manifest.chunks}
            for _ in range(3):
                grant = await client.lease()
                assert (grant.chunk, grant.samples, grant.size) in entries
                assert client.granted_by(grant) == owner.identity.peer_id_bytes
            assert hostile_server.served_requests == 0

            # Named explicitly (tried first), the hostile server's grant is refused, it is
            # scored down, and the lease comes from the owner's server.
            named = dataset_client(other, run, tmp_path / "cache-2", expected_manifest=digest,
                                   servers=[_ref(hostile)], announce_holdings=False)
            grant = await named.lease()
            assert (grant.chunk, grant.samples, grant.size) in entries
            assert named.granted_by(grant) == owner.identity.peer_id_bytes
            assert hostile_server.served_requests >= 1
            assert other.violations.get(hostile.peer_id.to_base58(), 0) >= 1

            # A config naming the hostile manifest finds it signed by someone else than the
            # run's owner: no manifest, no lease.
            fooled = dataset_client(other, run, tmp_path / "cache-3",
                                    expected_manifest=hostile_server.signed_manifest_digest,
                                    announce_holdings=False)
            with pytest.raises(PeerUnavailable, match="not the run's owner"):
                await fooled.verified_manifest()
        finally:
            for book in books:
                book.close()


async def test_without_a_manifest_in_the_config_any_server_is_used_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with swarm(2) as (owner, peer):
        run = derive_run_id(owner.identity.peer_id_bytes, "tiny")
        data_dir, manifest = packed_dataset(tmp_path, owner.identity)
        book = (await serve_dataset(owner, run, manifest, data_dir,
                                    tmp_path / "leases.sqlite")).book
        try:
            client = dataset_client(peer, run, tmp_path / "cache", announce_holdings=False)
            for _ in range(2):
                await client.lease()
            warnings = [r for r in caplog.records if "names no dataset manifest" in r.message]
            assert len(warnings) == 1
        finally:
            book.close()


async def test_a_no_lease_from_one_server_does_not_stop_the_client_asking_the_next(
    tmp_path: Path,
) -> None:
    async with swarm(4) as (owner, second, greedy, peer):
        run = derive_run_id(owner.identity.peer_id_bytes, "tiny")
        data_dir, manifest = packed_dataset(tmp_path, owner.identity)
        books = [
            (await serve_dataset(node, run, manifest, data_dir, tmp_path / f"leases-{i}.sqlite",
                                 DatasetConfig(lease_seconds=60, max_leases_per_peer=8))).book
            for i, node in enumerate((owner, second))
        ]
        try:
            # Every chunk of the second server is out, of this epoch and the next, so it
            # answers NoLease.
            taker = dataset_client(greedy, run, tmp_path / "cache-g", servers=[_ref(second)],
                                   announce_holdings=False)
            for _ in range(2 * len(manifest.chunks)):
                assert isinstance(await taker.try_lease(), LeaseGrant)
            client = dataset_client(peer, run, tmp_path / "cache", servers=[_ref(second)],
                                    announce_holdings=False)
            reply = await client.try_lease()
            assert isinstance(reply, LeaseGrant)
            assert client.granted_by(reply) == owner.identity.peer_id_bytes
        finally:
            for book in books:
                book.close()

