"""Where a remote peer connects from, as the limits that count networks need it: the remote IP
of a stream or connection, whether the connection is relayed (then the IP is the relay's), and
the network (``networks.network_of``) a peer counts for."""

from __future__ import annotations

import contextlib

from libp2p.abc import IHost
from libp2p.peer.id import ID

from dandelion_p2p.net.addrs import is_relayed
from dandelion_p2p.networks import UNKNOWN_NETWORK, network_of


def remote_ip(conn_or_stream: object) -> str | None:
    """The remote IP address of a stream or a muxed connection; None when it has none (an
    in-memory stream) or is closing. The concrete muxers have ``get_remote_address``; the
    libp2p interface does not declare it."""
    try:
        get = getattr(conn_or_stream, "get_remote_address", None)
        address = get() if callable(get) else None
    except Exception:
        return None
    return str(address[0]) if address else None


def is_direct_connection(muxed_conn: object) -> bool:
    """True when the connection is known not to run through a relay (whose IP it would
    show); False when relayed, or when that cannot be told (a closing connection)."""
    try:
        addresses = muxed_conn.get_transport_addresses()  # type: ignore[attr-defined]
        return not any(is_relayed(str(a)) for a in addresses)
    except Exception:
        return False


def peer_ip(host: IHost, peer_id: ID, *, direct_only: bool) -> str | None:
    """The remote IP of the first of ``peer_id``'s connections that has one; ``direct_only``:
    skip relayed connections (whose IP is the relay's)."""
    with contextlib.suppress(Exception):
        for conn in host.get_network().get_connections(peer_id):
            muxed = conn.muxed_conn
            if direct_only and not is_direct_connection(muxed):
                continue
            ip = remote_ip(muxed)
            if ip is not None:
                return ip
    return None


def peer_network(host: IHost, peer_id: ID, *, direct_only: bool) -> str:
    """The network of ``peer_ip``; a peer reached only through a relay is ``UNKNOWN_NETWORK``
    with ``direct_only``. A relayed connection otherwise counts for the relay's network, which
    bounds what all peers behind that relay hold together."""
    ip = peer_ip(host, peer_id, direct_only=direct_only)
    return UNKNOWN_NETWORK if ip is None else network_of(ip)
