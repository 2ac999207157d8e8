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
from dandelion_p2p.dataset.messages import (
    DATASET,
    LEASE_PROTOCOL,
    MAX_REPLY,
    LeaseGrant,
    LeaseRequest,
)
from dandelion_p2p.errors import ConfigError, DandelionError, RemoteRejected
from dandelion_p2p.identity import Identity
from dandelion_p2p.net.node import SwarmNode
from dandelion_p2p.net.streams import request
from dandelion_p2p.runconfig.publication import derive_run_id
from dandelion_p2p.runconfig.schema import (
    MAX_ADMITTED,
    NOT_ADMITTED,
    AdmissionConfig,
    from_dict,
)
from dandelion_p2p.services import DHT_NAMESPACES
from dandelion_p2p.sync.statesync_core import MAX_REPLY as STATE_MAX_REPLY
from dandelion_p2p.sync.statesync_core import PROTOCOL_ID as STATE_PROTOCOL
from dandelion_p2p.sync.statesync_core import STATE, StateOffer, StateOffered
from dandelion_p2p.wire import Message, RejectCode
from tests.averaging.test_averager import FAST, averaging_swarm
from tests.daemon_proc import start_daemon
from tests.dataset.helpers import dataset_client, packed_dataset, serve_dataset
from tests.swarm import public_settings, swarm
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

        async def average(i: int) -> None:
            try:
                reports[i] = await nodes[i].averager.all_reduce(buffers[i], 1.0, 1)
            except (NoGroup, DandelionError) as exc:
                if i < n:
                    raise
                outsider_error.append(exc)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(n + 1):
                    nursery.start_soon(average, i)
    want = np.mean(vectors[:n], axis=0)
    for i in range(n):
        report = reports[i]
        assert report is not None and set(report.members) == ids, report
        assert report.complete and report.fraction_averaged == 1.0, report.to_dict()
        np.testing.assert_allclose(buffers[i], want, rtol=1e-5, atol=1e-6)
    outsider = reports[n]
    averaged = 0.0 if outsider is None else outsider.fraction_averaged
    print(f"\nclosed run: {n} admitted peers averaged 100 % among themselves; the outsider "
          f"that announced with them averaged {100 * averaged:.0f} % "
          f"({type(outsider_error[0]).__name__ if outsider_error else 'a report'})")
    assert averaged == 0.0
    np.testing.assert_array_equal(buffers[n], vectors[n])


async def test_the_dataset_server_of_a_closed_run_refuses_outsiders(tmp_path: Path) -> None:
    async with swarm(3) as (owner, member, outsider):
        run = derive_run_id(owner.identity.peer_id_bytes, "tiny")
        data_dir, manifest = packed_dataset(tmp_path, owner.identity)
        admission = AdmissionConfig(peers=(member.identity.peer_id.to_base58(),))
        server = await serve_dataset(owner, run, manifest, data_dir, tmp_path / "l.sqlite",
                                     admission=admission)
        try:
            client = dataset_client(member, run, tmp_path / "cache", announce_holdings=False)
            grant = await client.lease()
            assert isinstance(grant, LeaseGrant)
            assert len(await client.fetch(grant.chunk, expected_size=grant.size)) == grant.size
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
