"""The runs of a network, as their owners list them in the DHT."""

from __future__ import annotations

import logging

from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.net.ports import RecordStore
from dandelion_p2p.runconfig.publication import RUNS_NAMESPACE, RunListing, decode_listings

log = logging.getLogger(__name__)


async def list_runs(records: RecordStore, network: str) -> list[RunListing]:
    """Every run listed in ``network``, newest version of each, most recently updated first.

    Raises ``DandelionError`` subclasses when the DHT cannot be read.
    """
    newest: dict[str, RunListing] = {}
    for record in await records.get(RUNS_NAMESPACE, network.encode()):
        try:
            listings = decode_listings(record.value)
        except ProtocolViolation as exc:
            log.info("ignored a runs record: %s", exc)
            continue
        for listing in listings.runs:
            held = newest.get(listing.run)
            if held is None or listing.version > held.version:
                newest[listing.run] = listing
    return sorted(newest.values(), key=lambda r: r.updated_at_ms, reverse=True)
