"""The notes protocol without I/O: a small authenticated message, answered by a signed receipt.

Used to check end-to-end reachability (``dandelion-p2p send``) and by tests. Each note is
signed by its sender over (sender, recipient, text, time, nonce); the receiver checks that the
signer is the peer on the other end of the authenticated connection and that the note is
addressed to it and recent, then answers with a note of its own carrying the same nonce.
``NoteInbox`` is the responder (a note in, a receipt out), ``check_receipt`` the requester's
last step; times come in as arguments.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.identity import PeerId, verify_by_peer
from dandelion_p2p.net.ports import Signer
from dandelion_p2p.wire import Message, Registry, RejectCode, invalid
from dandelion_p2p.wire.signed import SignedMessage

log = logging.getLogger(__name__)

NOTES = Registry("notes")
PROTOCOL_ID = "/dandelion/note/1.0.0"
MAX_FRAME = 8 * 1024
MAX_TEXT = 1024
MAX_AGE_MS = 300_000
NONCE_SIZE = 16
KEEP_RECEIVED = 100
RECEIPT_PREFIX = "received: "
# What ``Note.check`` accepts as a signature until ``signed_with`` replaces it.
_UNSIGNED = bytes(64)


@NOTES.message(1)
class Note(SignedMessage):
    SIGNING_DOMAIN = b"dandelion/note/v1"

    sender: bytes
    recipient: bytes
    text: str
    sent_at_ms: int
    nonce: bytes
    signature: bytes

    def check(self) -> None:
        if len(self.text) > MAX_TEXT:
            raise invalid(f"Note.text longer than {MAX_TEXT} characters")
        if len(self.nonce) != NONCE_SIZE:
            raise invalid(f"Note.nonce must be {NONCE_SIZE} bytes")
        if len(self.signature) != 64:
            raise invalid("Note.signature must be 64 bytes")


def sign_note(
    signer: Signer, recipient: bytes, text: str, nonce: bytes, *, sent_at_ms: int | None = None
) -> Note:
    """A note from ``signer`` to ``recipient``, dated ``sent_at_ms`` (default: now)."""
    unsigned = Note(
        sender=signer.peer_id_bytes,
        recipient=recipient,
        text=text,
        sent_at_ms=int(time.time() * 1000) if sent_at_ms is None else sent_at_ms,
        nonce=nonce,
        signature=_UNSIGNED,
    )
    return unsigned.signed_with(signer.sign)


def verify_note(note: Note, *, from_peer: bytes, to_peer: bytes, now_ms: int) -> None:
    """Section 4, in its order. Raises ``ProtocolViolation`` with the code of the first
    rule broken."""
    if note.sender != from_peer:
        raise ProtocolViolation(RejectCode.FORBIDDEN, "note sender is not the connected peer")
    if note.recipient != to_peer:
        raise ProtocolViolation(RejectCode.INVALID_FIELD, "note is addressed to another peer")
    if abs(now_ms - note.sent_at_ms) > MAX_AGE_MS:
        raise ProtocolViolation(RejectCode.EXPIRED, "note is too old or from the future")
    if not verify_by_peer(note.sender, note.signed_bytes(), note.signature):
        raise ProtocolViolation(RejectCode.BAD_SIGNATURE, "note signature does not verify")


def check_receipt(reply: Message, note: Note, *, from_peer: bytes, now_ms: int) -> Note:
    """The requester's check of the answer to ``note``, sent to ``from_peer``.

    Raises:
        ProtocolViolation: ``UNEXPECTED`` for a reply that is not a receipt of this note
            (another type, another nonce), else the codes of ``verify_note``.
    """
    if not isinstance(reply, Note) or reply.nonce != note.nonce:
        raise ProtocolViolation(RejectCode.UNEXPECTED, "receipt does not match the note")
    verify_note(reply, from_peer=from_peer, to_peer=note.sender, now_ms=now_ms)
    return reply


@dataclass(frozen=True)
class ReceivedNote:
    sender: str
    text: str
    sent_at_ms: int
    received_at_ms: int


class NoteInbox:
    """The responder: verifies each note, keeps the last ``keep``, and signs its receipt."""

    def __init__(self, signer: Signer, *, keep: int = KEEP_RECEIVED) -> None:
        self.signer = signer
        self.received: deque[ReceivedNote] = deque(maxlen=keep)

    def receive(self, msg: Message, *, from_peer: bytes, now_ms: int) -> Note:
        """The receipt for a note that came from ``from_peer``.

        Raises:
            ProtocolViolation: ``UNKNOWN_TYPE`` for anything but a note, else the codes of
                ``verify_note``; nothing is kept then.
        """
        if not isinstance(msg, Note):
            raise ProtocolViolation(RejectCode.UNKNOWN_TYPE, "expected a Note")
        verify_note(msg, from_peer=from_peer, to_peer=self.signer.peer_id_bytes, now_ms=now_ms)
        sender = PeerId(from_peer).to_base58()
        self.received.append(ReceivedNote(sender, msg.text, msg.sent_at_ms, now_ms))
        log.info("signed note from %s: %r", sender, msg.text)
        receipt_text = f"{RECEIPT_PREFIX}{msg.text}"[:MAX_TEXT]
        return sign_note(self.signer, msg.sender, receipt_text, msg.nonce, sent_at_ms=now_ms)
