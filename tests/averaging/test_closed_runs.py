"""Closed runs: a run config that lists the only peers it admits (``[admission] peers``).

Outsiders announce for the admitted peers' rounds and ask the run's dataset server for leases
and the manifest over real loopback hosts; they are ignored and refused, and the admitted
peers average and lease as before.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
import trio
from libp2p.peer.id import ID

from dandelion_p2p.averaging.averager import NoGroup
from dandelion_p2p.averaging.report import RoundReport
from dandelion_p2p.dataset.holders import CHUNK_NAMESPACE, chunk_key
from dandelion_p2p.dataset.messages import (
    DATASET,
    LEASE_PROTOCOL,
    MAX_REPLY,
    LeaseGrant,
    LeaseRequest,
)
from dandelion_p2p.dataset.transfer import fetch_chunk
from dandelion_p2p.errors import ConfigError, DandelionError, RemoteRejected
from dandelion_p2p.identity import Identity
from dandelion_p2p.net.node import SwarmNode
from dandelion_p2p.net.streams import request
from dandelion_p2p.runconfig.admission import MAX_ADMITTED, NOT_ADMITTED, AdmissionConfig
from dandelion_p2p.runconfig.publication import derive_run_id
from dandelion_p2p.runconfig.schema import from_dict
from dandelion_p2p.runconfig.schema import loads as load_config
from dandelion_p2p.services import DHT_NAMESPACES
from dandelion_p2p.sync.catchup import CatchUp
from dandelion_p2p.sync.runsource import CurrentRun, LocalFileSource, RunDocument
from dandelion_p2p.sync.statesync_core import MAX_REPLY as STATE_MAX_REPLY
from dandelion_p2p.sync.statesync_core import PROTOCOL_ID as STATE_PROTOCOL
from dandelion_p2p.sync.statesync_core import STATE, StateOffer, StateOffered
from dandelion_p2p.wire import Message, RejectCode
from dandelion_p2p.worker.protocol import claim_work_dir, work_dir_for
from tests.averaging.test_averager import FAST, averaging_swarm
from tests.daemon_proc import start_daemon
from tests.dataset.helpers import dataset_client, packed_dataset, serve_dataset
from tests.swarm import public_settings, swarm
from tests.sync.test_leased_training import owner_and_run, start_server
from tests.worker.runconfigs import tiny_run


def config_with(peers: list[str]) -> dict[str, object]:
    return {"name": "closed", "model": {"base": "m"}, "admission": {"peers": peers}}


def test_the_admission_list_holds_distinct_ed25519_peer_ids() -> None:
    ids = [Identity.generate().peer_id.to_base58() for _ in range(3)]
    config = from_dict(config_with(ids))
    assert from_dict(config.to_dict()) == config
    admitted = config.admission.admitted()
    assert admitted is not None and len(admitted) == 3
    assert config.admission.admits(Identity.from_seed(b"\x01" * 32).peer_id_bytes) is False
    assert AdmissionConfig().admitted() is None and AdmissionConfig().admits(b"anyone")
    for bad, why in [
        ([ids[0], ids[0]], "distinct"),
        (["12D3KooWnotapeerid"], "peer id"),
        (["QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"], "peer id"),  # not ed25519
        ([ids[0]] * (MAX_ADMITTED + 1), "at most"),
    ]:
        with pytest.raises(ConfigError, match=why):
            from_dict(config_with(bad))


async def test_admitted_peers_ignore_an_outsiders_announcements() -> None:
    n = 3
    async with averaging_swarm(n + 1, FAST) as nodes:
        members, outsider = nodes[:n], nodes[n]
        ids = frozenset(m.node.identity.peer_id_bytes for m in members)
        closed = dataclasses.replace(FAST.matchmaking, admitted=ids)
        for m in members:
            m.averager.settings = dataclasses.replace(m.averager.settings, matchmaking=closed)
            m.averager.matchmaker.settings = closed
        rng = np.random.default_rng(3)
        vectors = [rng.standard_normal(50_000).astype(np.float32) for _ in range(n + 1)]
        buffers = [v.copy() for v in vectors]
        reports: list[RoundReport | None] = [None] * (n + 1)
        outsider_error: list[Exception] = []
        # Round 2 gathers with the peers expected from round 1 (another path of reading the
        # announcements: the round key's own servers read their stores).
        averaged: list[float] = []
        for round_ in (1, 2):
            starts = [b.copy() for b in buffers]
            reports[:] = [None] * (n + 1)

            async def average(i: int, round_: int = round_) -> None:
                try:
                    reports[i] = await nodes[i].averager.all_reduce(buffers[i], 1.0, round_)
                except (NoGroup, DandelionError) as exc:
                    if i < n:
                        raise
                    outsider_error.append(exc)

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for i in range(n + 1):
                        nursery.start_soon(average, i)
            want = np.mean(starts[:n], axis=0)
            for i in range(n):
                report = reports[i]
                assert report is not None and set(report.members) == ids, (round_, report)
                assert report.complete and report.fraction_averaged == 1.0, report.to_dict()
                np.testing.assert_allclose(buffers[i], want, rtol=1e-5, atol=1e-6)
            outsider = reports[n]
            averaged.append(0.0 if outsider is None else outsider.fraction_averaged)
            np.testing.assert_array_equal(buffers[n], starts[n])
    print(f"\nclosed run: {n} admitted peers averaged 100 % among themselves in rounds 1 and "
          f"2; the outsider that announced with them averaged {averaged}")
    assert averaged == [0.0, 0.0]


async def test_the_dataset_server_of_a_closed_run_refuses_outsiders(tmp_path: Path) -> None:
    async with swarm(3) as (owner, member, outsider):
        run = derive_run_id(owner.identity.peer_id_bytes, "tiny")
        data_dir, manifest = packed_dataset(tmp_path, owner.identity)
        admission = AdmissionConfig(peers=(member.identity.peer_id.to_base58(),))
        server = await serve_dataset(owner, run, manifest, data_dir, tmp_path / "l.sqlite",
                                     admission=admission)
        try:
            client = dataset_client(member, run, tmp_path / "cache")
            client.admitted = frozenset({member.identity.peer_id_bytes,
                                         owner.identity.peer_id_bytes})
            grant = await client.lease()
            assert isinstance(grant, LeaseGrant)
            assert len(await client.fetch(grant.chunk, expected_size=grant.size)) == grant.size
            # The member's cache serves the closed run's chunk to admitted peers only, and
            # does not announce it in the DHT.
            client.install()
            with pytest.raises(RemoteRejected, match="not admitted"):
                await fetch_chunk(outsider.host, ID(member.identity.peer_id_bytes), grant.chunk)
            assert await client.holders(grant.chunk) == []
            assert not await outsider.records.get(CHUNK_NAMESPACE, chunk_key(grant.chunk))
            codes = []
            for _ in range(3):
                with pytest.raises(RemoteRejected) as exc:
                    await request(outsider.host, ID(owner.identity.peer_id_bytes),
                                  LEASE_PROTOCOL, LeaseRequest(run=run), DATASET,
                                  max_reply=MAX_REPLY, timeout=10.0)
                codes.append(RejectCode(exc.value.code))
                assert NOT_ADMITTED in str(exc.value), exc.value
            stranger = dataset_client(outsider, run, tmp_path / "cache-o",
                                      announce_holdings=False,
                                      expected_manifest=server.signed_manifest_digest)
            with pytest.raises(DandelionError):
                await stranger.verified_manifest()
            with pytest.raises(DandelionError):
                await stranger.fetch(grant.chunk, expected_size=grant.size)
            served = server.served_requests
        finally:
            server.book.close()
    print(f"\nclosed run's dataset server: the admitted peer leased and fetched a chunk; "
          f"the outsider's lease requests were refused {[c.name for c in codes]}, and it got "
          f"neither the manifest nor the chunk")
    assert codes == [RejectCode.FORBIDDEN] * 3
    assert served == 1, "refused requests are answered unread"


def test_a_daemon_a_closed_run_does_not_list_trains_not_and_serves_state_to_the_listed(
    tmp_path: Path,
) -> None:
    """The daemon publishes a closed run listing one other peer, not itself: it starts no
    worker and says why; its state server answers the listed peer and refuses anyone else."""
    listed, stranger = Identity.generate(), Identity.generate()
    config = tiny_run(tmp_path / "model")
    config = dataclasses.replace(
        config, admission=AdmissionConfig(peers=(listed.peer_id.to_base58(),)))
    run_config = tmp_path / "run.toml"
    run_config.write_text(config.to_toml())
    daemon = start_daemon("daemon", ["--no-webui", "--listen", "/ip4/127.0.0.1/tcp/0",
                                     "--reachability", "public", "--run-config",
                                     str(run_config)], tmp_path / "d")
    try:
        deadline = time.monotonic() + 60
        while "closed" not in (status := daemon.call("training.status"))["detail"]:
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        run = status["run"]
        assert daemon.peer_id in status["detail"] and "admission.peers" in status["detail"]

        async def ask(identity: Identity) -> Message | RejectCode:
            node = SwarmNode(identity, public_settings(bootstrap=(daemon.addrs[0],)),
                             namespaces=DHT_NAMESPACES)
            async with node.running():
                try:
                    return await request(node.host, ID.from_base58(daemon.peer_id),
                                         STATE_PROTOCOL, StateOffer(run=run), STATE,
                                         max_reply=STATE_MAX_REPLY, timeout=10.0)
                except RemoteRejected as exc:
                    assert NOT_ADMITTED in str(exc), exc
                    return RejectCode(exc.code)

        answers = [trio.run(ask, who) for who in (listed, stranger)]
        print(f"\na daemon its closed run does not list: {status['state']} "
              f"({status['detail']}); its state server answered the listed peer "
              f"{type(answers[0]).__name__}, the other {RejectCode(answers[1]).name}")
        assert isinstance(answers[0], StateOffered) and answers[0].run == run
        assert answers[1] == RejectCode.FORBIDDEN
        assert daemon.call("training.status")["crashes"] == 0
    finally:
        code, _ = daemon.stop(timeout=30)
    assert code == 0


def test_a_closed_runs_owner_daemon_gives_its_manifest_and_chunks_to_admitted_peers_only(
    tmp_path: Path,
) -> None:
    """The daemon path: the owner's one chunk handler serves its dataset's chunks, the signed
    manifest among them, and those cached for training."""
    listed, stranger = Identity.generate(), Identity.generate()
    server_dir, toml, _, chunks = owner_and_run(
        tmp_path, tmp_path / "model", 4, admission={"peers": [listed.peer_id.to_base58()]})
    digest = load_config(toml.read_text()).dataset.manifest
    owner = start_server(server_dir, toml, tmp_path)
    try:
        names = [digest, *chunks]

        async def fetch_all(identity: Identity) -> list[str]:
            node = SwarmNode(identity, public_settings(bootstrap=(owner.addrs[0],)),
                             namespaces=DHT_NAMESPACES)
            out = []
            async with node.running():
                for name in names:
                    try:
                        await fetch_chunk(node.host, ID.from_base58(owner.peer_id), name)
                        out.append("served")
                    except RemoteRejected as exc:
                        assert NOT_ADMITTED in str(exc), exc
                        out.append(RejectCode(exc.code).name)
            return out

        got = {who: trio.run(fetch_all, identity)
               for who, identity in (("listed", listed), ("stranger", stranger))}
    finally:
        code, _ = owner.stop(timeout=30)
    print(f"\nclosed run's owner daemon, manifest and {len(chunks)} chunks: listed peer "
          f"{set(got['listed'])}, stranger {set(got['stranger'])}")
    assert got["listed"] == ["served"] * len(names)
    assert got["stranger"] == ["FORBIDDEN"] * len(names)
    assert code == 0


async def test_a_catch_up_of_a_closed_run_asks_admitted_peers_only() -> None:
    async with swarm(4) as nodes:
        me, admitted_peer = nodes[0], nodes[1]
        for node in nodes[1:]:
            await me.connect_peer(ID(node.identity.peer_id_bytes))
        open_run = CatchUp(me, wait_for_peers=0.0)
        closed_run = CatchUp(me, wait_for_peers=0.0,
                             admitted=lambda: frozenset({admitted_peer.identity.peer_id_bytes}))
        everyone = {p.to_bytes() for p in await open_run.training_peers()}
        asked = [p.to_bytes() for p in await closed_run.training_peers()]
    assert everyone >= {n.identity.peer_id_bytes for n in nodes[1:]}
    assert asked == [admitted_peer.identity.peer_id_bytes]


def test_switching_runs_stops_serving_the_last_runs_checkpoints(tmp_path: Path) -> None:
    current = CurrentRun("closed-run", LocalFileSource(tmp_path / "missing.toml"),
                         tmp_path / "worker")
    current.checkpoint_dir = tmp_path / "worker" / "closed" / "checkpoints"
    assert current.checkpoints() == current.checkpoint_dir
    current.switch("another-run")
    assert current.checkpoints() is None


def test_another_owners_run_of_the_same_name_gets_a_worker_folder_of_its_own(
    tmp_path: Path,
) -> None:
    root = tmp_path / "worker"
    first = work_dir_for(root, "tiny", "tiny-aaaa")
    assert first == root / "tiny"
    claim_work_dir(first, "tiny-aaaa")
    claim_work_dir(first, "tiny-bbbb")  # marked already: the mark stays the first run's
    assert work_dir_for(root, "tiny", "tiny-aaaa") == root / "tiny"
    assert work_dir_for(root, "tiny", "tiny-bbbb") == root / "tiny-bbbb"
    # A folder from before the marks is taken by whichever run comes first.
    assert work_dir_for(root, "legacy", "legacy-cccc") == root / "legacy"
    # The daemon serves checkpoints from the folder the worker of its run uses.
    current = CurrentRun("tiny-bbbb", LocalFileSource(None), root)
    tiny = from_dict({"name": "tiny", "model": {"base": "m"}})
    current.document = RunDocument("tiny-bbbb", "", tiny, "test")
    assert current.checkpoints() == root / "tiny-bbbb" / "checkpoints"
    current.id = "tiny-aaaa"
    assert current.checkpoints() == root / "tiny" / "checkpoints"
