"""Peer scores: a cheating peer is banned, refused, shown in status, and stays banned."""

from __future__ import annotations

from pathlib import Path

from dandelion_p2p.identity import Identity
from dandelion_p2p.net.dht import messages as dht
from dandelion_p2p.net.dht.messages import DHT, PutRecord
from dandelion_p2p.reputation.store import SCORES_FILENAME
from dandelion_p2p.wire import Reject, RejectCode, encode
from tests.swarm import public_settings, running_node
from tests.test_daemon_robustness import exchange, forged_record, frame, raw_host


async def test_forger_is_banned_persistently_and_shown_in_status(tmp_path: Path) -> None:
    attacker_identity = Identity.generate()
    attacker_b58 = attacker_identity.peer_id.to_base58()
    async with running_node(public_settings(data_dir=tmp_path)) as victim:
        async with raw_host(attacker_identity, connect_to=victim) as attacker:
            put = frame(encode(PutRecord(record=forged_record(attacker_identity, victim))))
            reply = (await exchange(attacker, victim, dht.PROTOCOL_ID, put)).only_reply(
                DHT, dht.MAX_FRAME
            )
            assert isinstance(reply, Reject) and reply.code == RejectCode.BAD_SIGNATURE
            assert victim.is_banned(attacker.get_id())
            again = (await exchange(attacker, victim, dht.PROTOCOL_ID, put)).only_reply(
                DHT, dht.MAX_FRAME
            )
            assert isinstance(again, Reject) and again.detail == "banned"
        scores = {s["peer"]: s for s in victim.status()["scores"]}
        assert scores[attacker_b58]["banned_until"] is not None
        assert scores[attacker_b58]["events"] == {"bad_signature": 1}
    assert (tmp_path / SCORES_FILENAME).exists()

    # A restarted node with the same data dir still refuses the banned peer.
    async with running_node(public_settings(data_dir=tmp_path)) as restarted:
        assert restarted.is_banned(attacker_identity.peer_id)
        async with raw_host(attacker_identity, connect_to=restarted) as attacker:
            reply = (
                await exchange(attacker, restarted, dht.PROTOCOL_ID, frame(b"\x90"))
            ).only_reply(DHT, dht.MAX_FRAME)
            assert isinstance(reply, Reject) and reply.detail == "banned"
