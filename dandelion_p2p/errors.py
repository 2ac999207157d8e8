"""The project's error vocabulary.

Errors are split by whose fault they are:

* ``ProtocolViolation`` - a remote peer sent something it must not (malformed frame, forged
  signature, wrong type). The peer is scored down and the stream dropped; we keep running.
* ``PeerUnavailable`` - a remote peer could not be reached or answered too late. Transient:
  retrying later, or with another peer, may succeed.
* ``ConfigError`` - local input (flags, files, keys) is invalid. Reported to the user.

Local bugs are not wrapped: they raise as ordinary Python exceptions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dandelion_p2p.wire.reject import RejectCode


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
