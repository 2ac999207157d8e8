"""Which network an address stands for, so that limits can count networks as well as peers:
a thousand fresh identities cost nothing, a thousand networks do.

A network is an IPv4 /24 or an IPv6 /48 (an IPv4-mapped IPv6 address counts as its IPv4).
Loopback and private addresses are networks like any other, so that tests can stand for
several networks with 127.0.0.2, 127.0.1.5, ...; addresses that are not IP addresses (or
none at all: a relayed or in-memory stream) share the one network ``UNKNOWN_NETWORK``.
"""

from __future__ import annotations

import ipaddress

IPV4_PREFIX_BITS = 24
IPV6_PREFIX_BITS = 48
UNKNOWN_NETWORK = "unknown"


def network_of(address: str | None) -> str:
    """The network of ``address`` (an IP address as text), e.g. ``127.0.1.0/24``."""
    if not address:
        return UNKNOWN_NETWORK
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return UNKNOWN_NETWORK
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    bits = IPV4_PREFIX_BITS if ip.version == 4 else IPV6_PREFIX_BITS
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))


def public_network_of(address: str) -> str | None:
    """The network of a globally routable ``address``; None for loopback, LAN and other
    local addresses (for limits about strangers on the internet, not peers on one host)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if not ip.is_global:
        return None
    return network_of(address)
