"""What the daemon tells peers about its data plane when ``--announce`` names a port forward."""

from __future__ import annotations

import socket

import pytest

from dandelion_p2p.config import ConfigError, DaemonConfig
from dandelion_p2p.daemon import DataplaneAddresses, dataplane_addresses, is_own_address
from dandelion_p2p.identity import Identity
from dandelion_p2p.net.node import NodeSettings, SwarmNode

FORWARDED = "/ip4/203.0.113.7/tcp/4001"  # TEST-NET-3: on no interface of this machine


def public_node(*announce: str) -> SwarmNode:
    settings = NodeSettings(
        listen=("/ip4/0.0.0.0/tcp/0",), announce=announce, reachability="public"
    )
    return SwarmNode(Identity.generate(), settings)


def test_only_this_machines_addresses_count_as_its_own() -> None:
    assert is_own_address("127.0.0.1")
    assert not is_own_address("203.0.113.7")
    if socket.has_ipv6:
        assert not is_own_address("2001:db8::7")


def test_a_forwarded_announce_offers_no_unforwarded_data_port() -> None:
    addresses = dataplane_addresses(public_node(FORWARDED))
    assert addresses == DataplaneAddresses("0.0.0.0", None, direct=False)


def test_a_forwarded_data_port_is_offered_at_the_announced_ip() -> None:
    addresses = dataplane_addresses(public_node(FORWARDED), data_port=47123)
    assert addresses == DataplaneAddresses("0.0.0.0", "203.0.113.7", direct=True)


def test_an_announced_address_of_this_machine_offers_its_data_port() -> None:
    addresses = dataplane_addresses(public_node("/ip4/127.0.0.1/tcp/4001"))
    assert addresses == DataplaneAddresses("0.0.0.0", "127.0.0.1", direct=True)


def test_a_bound_listen_address_is_offered_as_it_is_unless_a_forward_is_announced() -> None:
    bound = NodeSettings(listen=("/ip4/127.0.0.1/tcp/0",))
    node = SwarmNode(Identity.generate(), bound)
    assert dataplane_addresses(node) == DataplaneAddresses("127.0.0.1", None, direct=True)
    forward = NodeSettings(listen=bound.listen, announce=(FORWARDED,))
    behind = SwarmNode(Identity.generate(), forward)
    assert dataplane_addresses(behind) == DataplaneAddresses("127.0.0.1", None, direct=False)


@pytest.mark.parametrize("port", [-1, 65536, True, "4002"])
def test_the_data_port_must_be_a_tcp_port(port: object) -> None:
    with pytest.raises(ConfigError, match="data_port"):
        DaemonConfig(data_port=port)  # type: ignore[arg-type]
