"""Helpers shared by the data plane tests: two peers, their session keys and channel cores."""

from __future__ import annotations

import os

from dandelion_p2p.dataplane.flow import ChannelCore, Role
from dandelion_p2p.dataplane.sealing import SessionKeys, derive_keys
from dandelion_p2p.identity import Identity

A = Identity.generate().peer_id
"""The opener's peer id in tests that build channels by hand."""
B = Identity.generate().peer_id
"""The acceptor's peer id in tests that build channels by hand."""


def session_keys() -> SessionKeys:
    """Fresh keys for a session between ``A`` (opener) and ``B`` (acceptor)."""
    return derive_keys(os.urandom(32), os.urandom(16), A.to_bytes(), B.to_bytes())


def channel_core(keys: SessionKeys, role: Role, max_frame: int, window: int | None) -> ChannelCore:
    """One end's core, with the same frame limit in both directions."""
    return ChannelCore.for_session(
        keys,
        role,
        receive_max_frame=max_frame,
        send_max_frame=max_frame,
        window_bytes=window,
    )
