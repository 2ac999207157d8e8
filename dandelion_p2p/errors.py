"""The project's error vocabulary.

Errors are split by whose fault they are:

* ``ProtocolViolation`` - a remote peer sent something it must not (malformed frame, forged
  signature, wrong type). The peer is scored down and the stream dropped; we keep running.
* ``PeerUnavailable`` - a remote peer could not be reached or answered too late. Transient:
  retrying later, or with another peer, may succeed.
* ``ConfigError`` - local input (flags, files, keys) is invalid. Reported to the user.

Local bugs are not wrapped: they raise as ordinary Python exceptions. A violation carries a
``RejectCode``: the enumerated reasons, each with a one-line meaning, sent to the peer (see
``protocol/wire.md``) and logged.
"""

from __future__ import annotations

from enum import IntEnum


class RejectCode(IntEnum):
    MALFORMED = 1
    TOO_LARGE = 2
    UNSUPPORTED_VERSION = 3
    UNKNOWN_TYPE = 4
    INVALID_FIELD = 5
    BAD_SIGNATURE = 6
    EXPIRED = 7
    STALE = 8
    UNEXPECTED = 9
    NOT_FOUND = 10
    RATE_LIMITED = 11
    INTERNAL = 12
    FORBIDDEN = 13
    TIMEOUT = 14
    OTHER_GROUP = 15

    @property
    def meaning(self) -> str:
        return MEANINGS[self]


MEANINGS: dict[RejectCode, str] = {
    RejectCode.MALFORMED: "the frame is not a well-formed message envelope",
    RejectCode.TOO_LARGE: "the frame is longer than this protocol allows",
    RejectCode.UNSUPPORTED_VERSION: "the envelope's wire version is not one we speak",
    RejectCode.UNKNOWN_TYPE: "the message type is unknown or not valid on this protocol",
    RejectCode.INVALID_FIELD: "a field is missing, unknown, of the wrong type or out of range",
    RejectCode.BAD_SIGNATURE: "a signature is missing or does not verify for the claimed signer",
    RejectCode.EXPIRED: "the record or request has expired, or expires too far in the future",
    RejectCode.STALE: "a newer version of this record is already stored",
    RejectCode.UNEXPECTED: "the message is valid but not expected in this state",
    RejectCode.NOT_FOUND: "the requested item is not here",
    RejectCode.RATE_LIMITED: "too many requests from this peer; retry later",
    RejectCode.INTERNAL: "the responder failed while handling a valid request",
    RejectCode.FORBIDDEN: "the sender may not do this (not the owner, or banned)",
    RejectCode.TIMEOUT: "the sender took too long",
    RejectCode.OTHER_GROUP: "the frame is for another view of this round's group",
}


def describe(code: int) -> str:
    """One-line meaning of a code, also for codes this version does not know."""
    try:
        return f"{RejectCode(code).name}: {RejectCode(code).meaning}"
    except ValueError:
        return f"code {code}: unknown reject code"


class DandelionError(Exception):
    """Base of every error this package raises on purpose."""


class ProtocolViolation(DandelionError):
    """A remote peer broke the protocol; carries the reject code we answer with."""

    def __init__(self, code: RejectCode, detail: str = "") -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"{code.name}: {detail}" if detail else code.name)


class PeerUnavailable(DandelionError):
    """A peer could not be reached, timed out, or closed the stream early (transient)."""


class RemoteRejected(DandelionError):
    """The remote peer answered our request with a reject code."""

    def __init__(self, code: int, detail: str = "") -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"remote rejected with code {code}: {detail}")


class ConfigError(DandelionError):
    """Invalid local configuration or input; the message says what to fix."""
