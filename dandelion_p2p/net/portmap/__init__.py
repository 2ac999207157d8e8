"""Port forwarding on the local NAT gateway via PCP (RFC 6887), NAT-PMP (RFC 6886) or UPnP IGD.

Off unless asked for: importing this package sends nothing. See ``docs/port-forwarding.md``.
"""

from dandelion_p2p.net.portmap.client import (
    DEFAULT_LIFETIME,
    METHODS,
    Method,
    PortMapping,
    PortMappingFailed,
    close,
    keep_mapped,
    open_mapping,
    renew,
)
from dandelion_p2p.net.portmap.route import default_gateway

__all__ = [
    "DEFAULT_LIFETIME",
    "METHODS",
    "Method",
    "PortMapping",
    "PortMappingFailed",
    "close",
    "default_gateway",
    "keep_mapped",
    "open_mapping",
    "renew",
]
