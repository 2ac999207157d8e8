"""Port forwarding on the local NAT gateway via PCP (RFC 6887), NAT-PMP (RFC 6886) or UPnP IGD.

Off unless asked for: importing this package sends nothing. See ``docs/port-forwarding.md``.
``client`` is the entry point (``open_mapping``, ``keep_mapped``, ``close``, ``renew``).
"""
