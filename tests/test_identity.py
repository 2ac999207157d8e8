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


_P = 2**255 - 19
_D = -121665 * pow(121666, -1, _P) % _P


def _x_for(y: int, sign: int) -> int | None:
    """Decompresses as RFC 8032 5.1.3 does; None where y is not on the curve."""
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P
    if v * x * x % _P != u:
        x = x * pow(2, (_P - 1) // 4, _P) % _P
    if v * x * x % _P != u:
        return None
    if x == 0 and sign:
        return None
    return _P - x if x % 2 != sign else x


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    (x1, y1), (x2, y2) = a, b
    t = _D * x1 * x2 * y1 * y2 % _P
    return (
        (x1 * y2 + x2 * y1) * pow(1 + t, -1, _P) % _P,
        (y1 * y2 + x1 * x2) * pow(1 - t, -1, _P) % _P,
    )


def _small_order_encodings() -> list[bytes]:
    from dandelion_p2p.identity import _SMALL_ORDER_YS

    encodings = []
    for y in _SMALL_ORDER_YS:
        for stored in (y, y + _P):
            if stored < 2**255:
                for sign in (0, 1):
                    encodings.append((stored | sign << 255).to_bytes(32, "little"))
    return encodings


def test_the_small_order_points_are_the_eight_torsion_points() -> None:
    from dandelion_p2p.identity import _SMALL_ORDER_YS

    points = {
        (x, y) for y in _SMALL_ORDER_YS for sign in (0, 1) if (x := _x_for(y, sign)) is not None
    }
    assert len(points) == 8
    for point in points:
        multiple = point
        for _ in range(3):
            multiple = _add(multiple, multiple)
        assert multiple == (0, 1)
    # 5 y-values, two of them (0, 1) with a non-canonical twin y + p, each with either sign bit
    assert len(_small_order_encodings()) == 14


def test_keys_of_small_order_are_refused_as_libsodium_refuses_them() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from nacl.bindings import crypto_core_ed25519_is_valid_point

    from dandelion_p2p.identity import has_small_order, verify

    identity_point = (1).to_bytes(32, "little")
    forged = identity_point + bytes(32)  # R = the identity point, S = 0
    # OpenSSL takes the key and the forgery, whatever the message: anyone could sign as it
    Ed25519PublicKey.from_public_bytes(identity_point).verify(forged, b"any message")
    for encoding in _small_order_encodings():
        assert has_small_order(encoding)
        assert not crypto_core_ed25519_is_valid_point(encoding)
        assert not verify(encoding, b"any message", forged)
    for _ in range(500):
        honest = Identity.generate()
        assert not has_small_order(honest.public_bytes)
        assert verify(honest.public_bytes, b"m", honest.sign(b"m"))
