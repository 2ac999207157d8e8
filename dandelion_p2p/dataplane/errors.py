"""Errors of the data plane beyond the project's common vocabulary."""

from __future__ import annotations

from dandelion_p2p.errors import PeerUnavailable


class ChannelClosed(PeerUnavailable):
    """The channel was closed in order: by the peer's CLOSE frame, by us, or because its nonce
    space is used up. Nothing was lost; every frame sent before the close was delivered.

    A subclass of ``PeerUnavailable`` so code that only cares whether more frames can flow
    handles both alike; code that must tell an orderly end from a failure catches this first.
    """
