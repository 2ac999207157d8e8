"""Catch-up while no peer is known: a waiting call looks again over the daemon's
``catch_up_wait``, spread over its tries; a call that does not wait answers at once.
On trio's virtual clock, with a node that knows no peer."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from libp2p.peer.id import ID

from dandelion_p2p.identity import Identity
from dandelion_p2p.sync.catchup import CATCH_UP_TRIES, CatchUp


class Lonely:
    """A node connected to no one, whose member records list only itself."""

    def __init__(self) -> None:
        self.peer_id = ID(Identity.generate().peer_id_bytes)
        self.lookups: list[float] = []

    @property
    def host(self) -> Any:
        return self

    def get_network(self) -> Any:
        return self

    def get_connections_map(self) -> dict[ID, object]:
        return {}

    async def connect_peer(self, peer_id: ID) -> None:
        raise AssertionError("there is no peer to connect to")

    async def members(self) -> Mapping[str, object]:
        self.lookups.append(trio.current_time())
        return {self.peer_id.to_base58(): object()}


@pytest.mark.parametrize("wait_for_peers", [9.0, 0.0])
async def test_a_waiting_catch_up_looks_again_over_the_wait(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, wait_for_peers: float
) -> None:
    node = Lonely()
    start = trio.current_time()
    answer = await CatchUp(node, wait_for_peers=wait_for_peers).run(
        "run", -1, tmp_path, wait=True)
    assert answer == {"step": -1, "detail": "no peers to ask"}
    assert len(node.lookups) == CATCH_UP_TRIES
    assert trio.current_time() - start == pytest.approx(wait_for_peers)
    assert node.lookups[-1] - node.lookups[0] == pytest.approx(wait_for_peers)


async def test_a_catch_up_that_does_not_wait_asks_once(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    node = Lonely()
    start = trio.current_time()
    answer = await CatchUp(node, wait_for_peers=9.0).run("run", -1, tmp_path, wait=False)
    assert answer == {"step": -1, "detail": "no peers to ask"}
    assert node.lookups == [start]
    assert trio.current_time() == start
