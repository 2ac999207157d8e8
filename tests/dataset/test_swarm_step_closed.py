"""A new config version of a closed run is placed at the step its admitted peers hold: the
run service asks the training service with the list of the version being published."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dandelion_p2p.dataset.service import SWARM_STEP_METHOD
from dandelion_p2p.identity import Identity
from dandelion_p2p.runconfig.schema import from_dict
from tests.dataset.test_runs_service import runs_service
from tests.swarm import swarm


async def test_the_swarm_step_of_a_closed_run_is_asked_of_its_peers_only(tmp_path: Path) -> None:
    listed = [Identity.generate().peer_id.to_base58() for _ in range(2)]
    closed = from_dict({"name": "c", "model": {"base": "m"}, "admission": {"peers": listed}})
    open_run = from_dict({"name": "o", "model": {"base": "m"}})
    asked: list[dict[str, Any]] = []
    async with swarm(1) as (node,), runs_service(node, tmp_path) as service:

        async def step_of(params: dict[str, Any]) -> dict[str, Any]:
            asked.append(params)
            return {"step": 40}

        service.ctx.handlers[SWARM_STEP_METHOD] = step_of
        steps = [await service._swarm_step("c-run", closed),
                 await service._swarm_step("o-run", open_run)]
    assert steps == [40, 40]
    assert asked == [{"run": "c-run", "admitted": listed}, {"run": "o-run"}]
