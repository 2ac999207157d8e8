"""The averager over fakes of its ports: constructing it does no I/O, the inbound handler is
registered once and given back, and a round with nobody else announced ends in ``NoGroup``
having touched only the ports."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
import trio
from libp2p.peer.id import ID

from dandelion_p2p.averaging.averager import Averager, AveragingSettings, NoGroup
from dandelion_p2p.averaging.kept_channels import PURPOSE_KEPT, PURPOSE_ONE_ROUND
from dandelion_p2p.averaging.matchmaking import AVERAGING_NAMESPACE, MatchmakingSettings
from dandelion_p2p.averaging.messages import decode_announcement
from dandelion_p2p.identity import Identity
from dandelion_p2p.net.dht.messages import SignedRecord
from dandelion_p2p.reputation.book import ScoreBook, ScoreEvent

ME = Identity.from_seed(b"\x31" * 32)


class FakeRecords:
    def __init__(self) -> None:
        self.puts: list[tuple[str, bytes, bytes]] = []
        self.prepared: list[tuple[str, bytes]] = []

    async def put(self, namespace: str, key: bytes, value: bytes, ttl: float, *,
                  keep: bool = True, timeout: float | None = None) -> int:
        self.puts.append((namespace, key, value))
        return 1

    async def get(self, namespace: str, key: bytes, *,
                  timeout: float | None = None) -> list[SignedRecord]:
        return []

    def held(self, namespace: str, key: bytes) -> list[SignedRecord] | None:
        return None

    def landing(self, namespace: str, key: bytes) -> trio.Event:
        return trio.Event()

    async def prepare_put(self, namespace: str, key: bytes, *,
                          timeout: float | None = None) -> None:
        self.prepared.append((namespace, key))

    def unpublish(self, namespace: str, key: bytes) -> None:
        pass


class FakeNode:
    """Links and reputation, as the swarm node provides them."""

    def __init__(self) -> None:
        self.reachable = True
        self.scores = ScoreBook()
        self.recorded: list[tuple[bytes, ScoreEvent]] = []
        self.connected: list[ID] = []

    async def connect_peer(self, peer_id: ID) -> None:
        self.connected.append(peer_id)

    def is_connected(self, peer_id: ID) -> bool:
        return False

    def record_score(self, peer: bytes, event: ScoreEvent) -> None:
        self.recorded.append((peer, event))

    def record_link_rate(self, peer: bytes, nbytes: int, seconds: float) -> None:
        pass


class FakeDataPlane:
    def __init__(self) -> None:
        self.handlers: dict[str, Callable[[Any], Awaitable[None]]] = {}
        self.opened: list[ID] = []

    @property
    def endpoint(self) -> str | None:
        return "127.0.0.1:9"

    def register(self, purpose: str, handler: Callable[[Any], Awaitable[None]]) -> None:
        if purpose in self.handlers:
            raise ValueError(f"a handler for {purpose!r} is already registered")
        self.handlers[purpose] = handler

    def unregister(self, purpose: str) -> None:
        self.handlers.pop(purpose, None)

    async def open(self, peer_id: ID, purpose: str, *, timeout: float = 10.0) -> Any:
        self.opened.append(peer_id)
        raise AssertionError("no channel is opened without a group")


def make() -> tuple[Averager, FakeRecords, FakeNode, FakeDataPlane]:
    records, node, dataplane = FakeRecords(), FakeNode(), FakeDataPlane()
    settings = AveragingSettings(
        matchmaking=MatchmakingSettings(gather_window=0.01, settle=0.01),
    )
    averager = Averager(signer=ME, records=records, links=node, reputation=node,
                        dataplane=dataplane, run=b"run-ports", settings=settings)
    return averager, records, node, dataplane


def test_constructing_an_averager_registers_nothing() -> None:
    averager, records, _, dataplane = make()
    assert dataplane.handlers == {} and records.puts == []
    averager.install()
    averager.install()
    assert list(dataplane.handlers) == [PURPOSE_KEPT, PURPOSE_ONE_ROUND]
    averager.uninstall()
    assert dataplane.handlers == {}


def test_a_second_averager_on_one_data_plane_is_refused_until_the_first_gives_way() -> None:
    first, _, _, dataplane = make()
    second = Averager(signer=ME, records=FakeRecords(), links=FakeNode(), reputation=FakeNode(),
                      dataplane=dataplane, run=b"run-other")
    first.install()
    with pytest.raises(ValueError):
        second.install()
    first.uninstall()
    second.install()
    assert list(dataplane.handlers) == [PURPOSE_KEPT, PURPOSE_ONE_ROUND]


async def test_a_round_alone_announces_through_the_record_store_and_finds_no_group() -> None:
    averager, records, node, dataplane = make()
    buffer = np.ones(1000, dtype=np.float32)
    with trio.fail_after(5), pytest.raises(NoGroup):
        await averager.all_reduce(buffer, 2.0, 4)
    (namespace, _key, value), = records.puts
    announcement = decode_announcement(value)
    assert namespace == AVERAGING_NAMESPACE
    assert (announcement.round, announcement.weight) == (4, 2.0)
    assert announcement.accepts_connections and announcement.endpoint == "127.0.0.1:9"
    # Installed before announcing.
    assert list(dataplane.handlers) == [PURPOSE_KEPT, PURPOSE_ONE_ROUND]
    assert node.connected == [] and dataplane.opened == [] and node.recorded == []
    assert np.all(buffer == 1.0)
