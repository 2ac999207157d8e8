"""Which relay a relayed connection runs through, told right on both of its ends.

py-libp2p 0.8.1 names an inbound circuit (the side that accepted it through its reservation)
``/p2p/<relay>/p2p-circuit/p2p/<remote>`` with the local peer id where the relay's belongs.
The relay is the peer at the other end of the STOP stream the circuit runs over; these
helpers find it there and correct the address.
"""

from __future__ import annotations

from libp2p.abc import INetConn
from libp2p.peer.id import ID


def relay_under(conn: INetConn) -> ID | None:
    """The relay carrying ``conn``, read from the stream the circuit runs over; None for a
    connection over anything else (TCP), or one whose layers this py-libp2p does not show."""
    try:
        noise = conn.muxed_conn.secured_conn.conn  # type: ignore[attr-defined]
        raw = noise.read_writer.read_write_closer
        relay = raw.stream.muxed_conn.peer_id
    except AttributeError:
        return None
    return relay if isinstance(relay, ID) else None


def transport_addrs(conn: INetConn, local: ID) -> list[str]:
    """``conn``'s transport addresses, an inbound circuit's naming its real relay."""
    addrs = [str(a) for a in conn.get_transport_addresses()]
    wrong = f"/p2p/{local.to_base58()}/p2p-circuit"
    if not any(a.startswith(wrong) for a in addrs):
        return addrs
    relay = relay_under(conn)
    if relay is None or relay == local:
        return addrs
    right = f"/p2p/{relay.to_base58()}/p2p-circuit"
    return [right + a[len(wrong):] if a.startswith(wrong) else a for a in addrs]
