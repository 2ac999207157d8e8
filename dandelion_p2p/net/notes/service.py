"""Notes over libp2p: serves ``protocol.NoteInbox`` on a stream handler and sends notes.
The decisions are ``protocol``'s; this module only moves messages."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable

from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from dandelion_p2p.net.notes.protocol import (
    KEEP_RECEIVED,
    MAX_FRAME,
    NONCE_SIZE,
    NOTES,
    PROTOCOL_ID,
    Note,
    NoteInbox,
    ReceivedNote,
    check_receipt,
    sign_note,
)
from dandelion_p2p.net.ports import Signer
from dandelion_p2p.net.streams import ViolationSink, request, serve_requests
from dandelion_p2p.wire import Message


def _now_ms() -> int:
    return int(time.time() * 1000)


class NoteService:
    """``install`` registers the handler on the host; the constructor does nothing else."""

    def __init__(
        self,
        host: IHost,
        signer: Signer,
        *,
        timeout: float,
        on_violation: ViolationSink | None = None,
        is_banned: Callable[[ID], bool] | None = None,
        keep: int = KEEP_RECEIVED,
    ) -> None:
        self.host = host
        self.signer = signer
        self.timeout = timeout
        self.on_violation = on_violation
        self.is_banned = is_banned
        self.inbox = NoteInbox(signer, keep=keep)

    @property
    def received(self) -> deque[ReceivedNote]:
        return self.inbox.received

    def install(self) -> None:
        self.host.set_stream_handler(
            TProtocol(PROTOCOL_ID),
            serve_requests(
                NOTES,
                self._answer,
                max_request=MAX_FRAME,
                timeout=self.timeout,
                on_violation=self.on_violation,
                refuse=self.is_banned,
            ),
        )

    async def _answer(self, peer_id: ID, msg: Message) -> Message:
        return self.inbox.receive(msg, from_peer=peer_id.to_bytes(), now_ms=_now_ms())

    async def send(self, peer_id: ID, text: str) -> Note:
        """Send a signed note and return the peer's verified, signed receipt.

        Raises:
            PeerUnavailable: no stream or no reply in time.
            RemoteRejected: the peer refused the note.
            ProtocolViolation: the receipt is not validly signed by ``peer_id``.
        """
        note = sign_note(self.signer, peer_id.to_bytes(), text, os.urandom(NONCE_SIZE))
        reply = await request(
            self.host, peer_id, PROTOCOL_ID, note, NOTES, max_reply=MAX_FRAME,
            timeout=self.timeout,
        )
        return check_receipt(reply, note, from_peer=peer_id.to_bytes(), now_ms=_now_ms())
