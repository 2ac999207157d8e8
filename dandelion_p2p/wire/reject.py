"""Enumerated reject codes, each with a one-line meaning, sent to the peer and logged."""

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
}


def describe(code: int) -> str:
    """One-line meaning of a code, also for codes this version does not know."""
    try:
        return f"{RejectCode(code).name}: {RejectCode(code).meaning}"
    except ValueError:
        return f"code {code}: unknown reject code"
