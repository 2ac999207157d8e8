"""Multiaddr helpers: parsing untrusted address strings, telling relayed from direct."""

from __future__ import annotations

import ipaddress

import multiaddr


def parse(addr: str) -> multiaddr.Multiaddr | None:
    """A multiaddr from an untrusted string, or None if it does not parse."""
    try:
        return multiaddr.Multiaddr(addr)
    except Exception:
        return None


def is_relayed(addr: str) -> bool:
    return "/p2p-circuit" in addr


def ip_of(addr: str) -> str | None:
    ma = parse(addr)
    if ma is None:
        return None
    for proto in ("ip4", "ip6"):
        try:
            return str(ma.value_for_protocol(proto))
        except Exception:
            continue
    return None


def is_unspecified(addr: str) -> bool:
    ip = ip_of(addr)
    return ip is not None and ipaddress.ip_address(ip).is_unspecified


def is_loopback(addr: str) -> bool:
    ip = ip_of(addr)
    return ip is not None and ipaddress.ip_address(ip).is_loopback


def without_peer_id(addr: str) -> str:
    """``/ip4/1.2.3.4/tcp/1/p2p/Qm..`` -> ``/ip4/1.2.3.4/tcp/1`` (circuit addresses untouched)."""
    if is_relayed(addr):
        return addr
    head, sep, _ = addr.partition("/p2p/")
    return head if sep else addr


def with_peer_id(addr: str, peer_id: str) -> str:
    if is_relayed(addr) or "/p2p/" in addr:
        return addr
    return f"{addr}/p2p/{peer_id}"
