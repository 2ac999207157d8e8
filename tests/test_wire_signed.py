"""The signed bytes of a SignedMessage follow its declared fields, and nothing else."""

from __future__ import annotations

import msgpack

from dandelion_p2p.identity import Identity, verify_by_peer
from dandelion_p2p.wire import Registry
from dandelion_p2p.wire.signed import SignedMessage

TEST = Registry("signed-test")


@TEST.message(1)
class Statement(SignedMessage):
    SIGNING_DOMAIN = b"dandelion/test-statement/v1"

    author: bytes
    count: int
    share: float
    names: tuple[str, ...]
    signature: bytes = b""


def test_signed_bytes_are_the_domain_then_every_other_field_in_order() -> None:
    message = Statement(author=b"\x01\x02", count=3, share=0.5, names=("a", "b"))
    assert msgpack.unpackb(message.signed_bytes()) == [
        b"dandelion/test-statement/v1", b"\x01\x02", 3, 0.5, ["a", "b"]
    ]


def test_signing_and_checking_round_trip_and_every_field_is_covered() -> None:
    identity = Identity.generate()
    signed = Statement(author=identity.peer_id_bytes, count=3, share=0.5, names=("a",))
    signed = signed.signed_with(identity.sign)
    assert verify_by_peer(identity.peer_id_bytes, signed.signed_bytes(), signed.signature)
    decoded = Statement.from_body(msgpack.unpackb(msgpack.packb(signed.to_body())))
    assert verify_by_peer(identity.peer_id_bytes, decoded.signed_bytes(), decoded.signature)
    for change in ({"count": 4}, {"share": 0.25}, {"names": ("a", "b")}, {"author": b"x" * 38}):
        forged = Statement(**{**signed.to_body(), "names": signed.names, **change})
        assert not verify_by_peer(identity.peer_id_bytes, forged.signed_bytes(), forged.signature)


def test_the_signature_is_not_part_of_what_it_signs() -> None:
    message = Statement(author=b"ab", count=1, share=1.0, names=())
    assert message.signed_with(lambda _: b"x").signed_bytes() == message.signed_bytes()


@TEST.message(2)
class Retraction(SignedMessage):
    SIGNING_DOMAIN = b"dandelion/test-retraction/v1"

    author: bytes
    count: int
    share: float
    names: tuple[str, ...]
    signature: bytes = b""


def test_the_domain_separates_messages_with_the_same_fields() -> None:
    fields = {"author": b"ab", "count": 1, "share": 1.0, "names": ()}
    assert Statement(**fields).signed_bytes() != Retraction(**fields).signed_bytes()
