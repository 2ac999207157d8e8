"""The default IPv4 gateway, read from Linux's ``/proc/net/route``."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

_RTF_UP = 0x1
_RTF_GATEWAY = 0x2


def parse_default_gateway(table: str) -> str | None:
    """The gateway of the lowest-metric default route in a ``/proc/net/route`` dump.

    Addresses are printed as ``%08X`` of a network-order value read as a host integer, so
    turning the number back into bytes in host order gives the address. Malformed lines are
    skipped.
    """
    best: tuple[int, str] | None = None
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            destination = int(fields[1], 16)
            gateway = int(fields[2], 16).to_bytes(4, sys.byteorder)
            flags = int(fields[3], 16)
            metric = int(fields[6])
            mask = int(fields[7], 16)
        except (ValueError, OverflowError):
            continue
        if destination or mask:
            continue
        if flags & (_RTF_UP | _RTF_GATEWAY) != _RTF_UP | _RTF_GATEWAY:
            continue
        address = ipaddress.IPv4Address(gateway)
        if address.is_unspecified:
            continue
        if best is None or metric < best[0]:
            best = (metric, str(address))
    return best[1] if best else None


def default_gateway(path: str = "/proc/net/route") -> str | None:
    """The default gateway of this host's network namespace, or None if there is none."""
    try:
        return parse_default_gateway(Path(path).read_text(encoding="ascii", errors="replace"))
    except OSError:
        return None
