"""The bulk data plane: sealed, credit-controlled channels between two peers.

Sessions are agreed over an authenticated libp2p stream; frames then travel over a plain TCP
connection sealed with AES-256-GCM, or over the libp2p stream itself where neither peer can be
dialed. See ``protocol/dataplane.md``.
"""

from dandelion_p2p.dataplane.channel import Channel, ChannelKind
from dandelion_p2p.dataplane.errors import ChannelClosed
from dandelion_p2p.dataplane.messages import PROTOCOL_ID, Mode
from dandelion_p2p.dataplane.sealing import DEFAULT_MAX_FRAME
from dandelion_p2p.dataplane.service import ChannelHandler, DataPlane

__all__ = [
    "DEFAULT_MAX_FRAME",
    "PROTOCOL_ID",
    "Channel",
    "ChannelClosed",
    "ChannelHandler",
    "ChannelKind",
    "DataPlane",
    "Mode",
]
