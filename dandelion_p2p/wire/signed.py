"""Signed messages: the fields a signature covers are the message's own, declared once.

A ``SignedMessage`` signs every field but ``signature``, in declaration order, after the
class's ``SIGNING_DOMAIN``, as one canonical msgpack array (wire.md 4.2). Adding a field to the
class adds it to the signed bytes; there is no second list to forget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Self

import msgpack

from dandelion_p2p.wire.schema import Message

SIGNATURE_FIELD = "signature"


def canonical_bytes(items: list[Any]) -> bytes:
    # msgpack-python already writes the canonical form (smallest ints, bin for bytes, float64
    # for floats); what must not vary is the list itself.
    packed: bytes = msgpack.packb(items, use_bin_type=True)
    return packed


class SignedMessage(Message):
    """Base of a message that carries a ``signature: bytes`` field over all its other fields."""

    __slots__ = ()
    SIGNING_DOMAIN: ClassVar[bytes]

    def signed_bytes(self) -> bytes:
        """The bytes ``signature`` signs."""
        values = [
            _plain(getattr(self, name)) for name, _, _ in self._FIELDS if name != SIGNATURE_FIELD
        ]
        return canonical_bytes([self.SIGNING_DOMAIN, *values])

    def signed_with(self, sign: Callable[[bytes], bytes]) -> Self:
        """This message with ``signature`` set by ``sign`` (an identity's ``sign``)."""
        return dataclasses.replace(self, **{SIGNATURE_FIELD: sign(self.signed_bytes())})

    @property
    def signature_bytes(self) -> bytes:
        signature: bytes = getattr(self, SIGNATURE_FIELD)
        return signature


def _plain(value: Any) -> Any:
    if isinstance(value, Message):
        return value.to_body()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
