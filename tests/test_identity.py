"""Our peer ids (computed without libp2p) against libp2p's own, the reference."""

from __future__ import annotations

import os

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.rsa import create_new_key_pair as create_rsa_key_pair
from libp2p.peer.id import ID

from dandelion_p2p.identity import (
    Identity,
    PeerId,
    base58_decode,
    base58_encode,
    public_key_of,
    verify_by_peer,
)
from dandelion_p2p.net.host import libp2p_peer_id


def test_peer_ids_match_libp2p() -> None:
    for _ in range(50):
        identity = Identity.generate()
        reference = ID.from_pubkey(create_new_key_pair(identity.seed).public_key)
        assert identity.peer_id_bytes == reference.to_bytes()
        assert identity.peer_id.to_base58() == reference.to_base58() == str(identity.peer_id)
        assert PeerId.from_base58(reference.to_base58()) == reference.to_bytes()
        # equal and hashed alike both ways, so the two mix in sets and dict keys
        assert identity.peer_id == reference and reference == identity.peer_id
        assert {identity.peer_id, reference} == {reference}
        assert libp2p_peer_id(identity.peer_id) == reference
        assert isinstance(libp2p_peer_id(identity.peer_id), ID)


@pytest.mark.parametrize("data", [b"", b"\0", b"\0\0\x01", b"\xff" * 40, os.urandom(34)])
def test_base58_round_trips_like_the_reference(data: bytes) -> None:
    text = base58_encode(data)
    assert text == ID(data).to_base58()
    assert base58_decode(text) == data


def test_bad_base58_is_a_value_error() -> None:
    for text in ["", "0OIl", "12D3KooW" + "0" * 10, "x" * 1000]:
        with pytest.raises(ValueError):
            PeerId.from_base58(text)


def test_public_key_only_from_canonical_ed25519_ids() -> None:
    identity = Identity.generate()
    assert public_key_of(identity.peer_id_bytes) == identity.public_bytes
    assert public_key_of(identity.peer_id_bytes[:-1]) is None
    assert public_key_of(b"\x01" + identity.peer_id_bytes[1:]) is None
    rsa_id = ID.from_pubkey(create_rsa_key_pair(bits=1024).public_key).to_bytes()
    assert public_key_of(rsa_id) is None
    signature = identity.sign(b"message")
    assert verify_by_peer(identity.peer_id_bytes, b"message", signature)
    assert not verify_by_peer(identity.peer_id_bytes, b"other", signature)
    assert not verify_by_peer(rsa_id, b"message", signature)
