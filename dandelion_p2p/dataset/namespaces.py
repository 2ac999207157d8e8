"""Every DHT namespace of the dataset and run-config subsystems, registered on every node:
a DHT server must be able to store these records whether or not it takes part in a run."""

from __future__ import annotations

from dandelion_p2p.dataset.holders import register_holder_namespaces
from dandelion_p2p.net.dht.records import RecordValidator
from dandelion_p2p.runconfig.publication import register_namespaces as register_run_namespaces


def register_namespaces(validator: RecordValidator) -> None:
    register_holder_namespaces(validator)
    register_run_namespaces(validator)
