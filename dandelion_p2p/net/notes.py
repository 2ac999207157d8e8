"""Signed notes between peers: a small authenticated message, answered by a signed receipt.

Used to check end-to-end reachability (``dandelion-p2p send``) and by tests. Each note is
signed by its sender over (sender, recipient, text, time, nonce); the receiver checks that the
signer is the peer on the other end of the authenticated connection and that the note is
addressed to it and recent, then answers with a note of its own carrying the same nonce.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import msgpack
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.identity import Identity, verify_by_peer
from dandelion_p2p.net.streams import ViolationSink, request, serve_requests
from dandelion_p2p.wire import Message, Registry, RejectCode, invalid

log = logging.getLogger(__name__)

NOTES = Registry("notes")
PROTOCOL_ID = TProtocol("/dandelion/note/1.0.0")
MAX_FRAME = 8 * 1024
MAX_TEXT = 1024
MAX_AGE_MS = 300_000
SIGNING_DOMAIN = b"dandelion/note/v1"


@NOTES.message(1)
class Note(Message):
    sender: bytes
    recipient: bytes
    text: str
    sent_at_ms: int
    nonce: bytes
    signature: bytes

    def check(self) -> None:
        if len(self.text) > MAX_TEXT:
            raise invalid(f"Note.text longer than {MAX_TEXT} characters")
        if len(self.nonce) != 16:
            raise invalid("Note.nonce must be 16 bytes")
        if len(self.signature) != 64:
            raise invalid("Note.signature must be 64 bytes")


def _payload(sender: bytes, recipient: bytes, text: str, sent_at_ms: int, nonce: bytes) -> bytes:
    return msgpack.packb(
        [SIGNING_DOMAIN, sender, recipient, text, sent_at_ms, nonce], use_bin_type=True
    )


def sign_note(identity: Identity, recipient: bytes, text: str, nonce: bytes) -> Note:
    sender = identity.peer_id_bytes
    sent = int(time.time() * 1000)
    return Note(
        sender=sender,
        recipient=recipient,
        text=text,
        sent_at_ms=sent,
        nonce=nonce,
        signature=identity.sign(_payload(sender, recipient, text, sent, nonce)),
    )


def verify_note(note: Note, *, from_peer: bytes, to_peer: bytes, now_ms: int) -> None:
    if note.sender != from_peer:
        raise ProtocolViolation(RejectCode.FORBIDDEN, "note sender is not the connected peer")
    if note.recipient != to_peer:
        raise ProtocolViolation(RejectCode.INVALID_FIELD, "note is addressed to another peer")
    if abs(now_ms - note.sent_at_ms) > MAX_AGE_MS:
        raise ProtocolViolation(RejectCode.EXPIRED, "note is too old or from the future")
    payload = _payload(note.sender, note.recipient, note.text, note.sent_at_ms, note.nonce)
    if not verify_by_peer(note.sender, payload, note.signature):
        raise ProtocolViolation(RejectCode.BAD_SIGNATURE, "note signature does not verify")


@dataclass(frozen=True)
class ReceivedNote:
    sender: str
    text: str
    sent_at_ms: int
    received_at_ms: int


class NoteService:
    def __init__(
        self,
        host: IHost,
        identity: Identity,
        *,
        timeout: float,
        on_violation: ViolationSink | None = None,
        is_banned: Callable[[ID], bool] | None = None,
        keep: int = 100,
    ) -> None:
        self.host = host
        self.identity = identity
        self.timeout = timeout
        self.on_violation = on_violation
        self.is_banned = is_banned
        self.received: deque[ReceivedNote] = deque(maxlen=keep)

    def install(self) -> None:
        self.host.set_stream_handler(
            PROTOCOL_ID,
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
        if not isinstance(msg, Note):
            raise ProtocolViolation(RejectCode.UNKNOWN_TYPE, "expected a Note")
        now = int(time.time() * 1000)
        verify_note(
            msg, from_peer=peer_id.to_bytes(), to_peer=self.identity.peer_id_bytes, now_ms=now
        )
        self.received.append(ReceivedNote(peer_id.to_base58(), msg.text, msg.sent_at_ms, now))
        log.info("signed note from %s: %r", peer_id, msg.text)
        return sign_note(self.identity, msg.sender, f"received: {msg.text}"[:MAX_TEXT], msg.nonce)

    async def send(self, peer_id: ID, text: str) -> Note:
        """Send a signed note and return the peer's verified, signed receipt.

        Raises:
            PeerUnavailable: no stream or no reply in time.
            RemoteRejected: the peer refused the note.
            ProtocolViolation: the receipt is not validly signed by ``peer_id``.
        """
        nonce = os.urandom(16)
        note = sign_note(self.identity, peer_id.to_bytes(), text, nonce)
        reply = await request(
            self.host,
            peer_id,
            PROTOCOL_ID,
            note,
            NOTES,
            max_reply=MAX_FRAME,
            timeout=self.timeout,
        )
        if not isinstance(reply, Note) or reply.nonce != nonce:
            raise ProtocolViolation(RejectCode.UNEXPECTED, "receipt does not match the note")
        verify_note(
            reply,
            from_peer=peer_id.to_bytes(),
            to_peer=self.identity.peer_id_bytes,
            now_ms=int(time.time() * 1000),
        )
        return reply
