"""``/metrics`` text rendering."""

from __future__ import annotations

import time

from dandelion_p2p.telemetry import Telemetry
from dandelion_p2p.webui.prometheus import render_metrics


def status(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "peer_id": "12D3KooWpeer",
        "version": "0.1.0",
        "network": 'odd"net\\work\n',
        "connected_peers": [{"connection": "direct"}, {"connection": "relayed"}],
        "routing_table_size": 3,
        "stored_records": 5,
        "relay_reservations": [{}],
        "reachable": False,
        "scores": [{"banned_until": time.time() + 60}, {"banned_until": None}],
        "violations": {"a": 2, "b": 1},
        "uptime_s": 12.5,
    }
    base.update(overrides)
    return base


def test_node_numbers_and_telemetry_in_text_format() -> None:
    telemetry = Telemetry()
    telemetry.describe("loss", "training loss\nof the last step")
    telemetry.record("loss", 0.5)
    telemetry.record("loss", 0.25)
    lines = render_metrics(status(), telemetry).splitlines()
    assert 'dandelion_node_info{peer_id="12D3KooWpeer",version="0.1.0",' \
           'network="odd\\"net\\\\work\\n"} 1.0' in lines
    for sample in (
        "dandelion_node_connected_peers 2.0",
        "dandelion_node_relayed_peers 1.0",
        "dandelion_node_relay_reservations 1.0",
        "dandelion_node_reachable 0.0",
        "dandelion_node_banned_peers 1.0",
        "dandelion_node_protocol_violations 3.0",
        "dandelion_node_uptime_seconds 12.5",
        "dandelion_loss 0.25",
        "# HELP dandelion_loss training loss\\nof the last step",
        "# TYPE dandelion_loss gauge",
    ):
        assert sample in lines, sample
    names = [line.split("{")[0].split(" ")[0] for line in lines if not line.startswith("#")]
    assert len(names) == len(set(names)), "each metric once"
