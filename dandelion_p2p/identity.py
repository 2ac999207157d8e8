"""Peer identity: an ed25519 key whose libp2p peer id is the peer's name in the swarm.

Keys are stored as unencrypted PKCS#8 PEM, file mode 0600. An ed25519 peer id embeds the
public key (identity multihash), so a signature can be checked against a peer id alone.

The peer id is computed here, from the libp2p peer-id specification, so that protocol cores
can name and verify peers without importing libp2p; ``net.host`` converts to libp2p's types.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from dandelion_p2p.errors import ConfigError

SIGNATURE_SIZE = 64
PUBLIC_KEY_SIZE = 32
# identity multihash (0x00), length 36, then the protobuf PublicKey {Type: Ed25519, Data: 32 B}
_ED25519_PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
ED25519_PEER_ID_SIZE = len(_ED25519_PEER_ID_PREFIX) + PUBLIC_KEY_SIZE
_BASE58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_BASE58_INDEX = {c: i for i, c in enumerate(_BASE58_ALPHABET)}
_FIELD_PRIME = 2**255 - 19
_Y_MASK = (1 << 255) - 1
MIN_PEER_ID_SIZE = 2
MAX_PEER_ID_SIZE = 64
"""Peer ids accepted from the wire: ed25519 ids are 38 bytes, hashed (RSA) ids 34."""


def base58_encode(data: bytes) -> str:
    zeros = len(data) - len(data.lstrip(b"\0"))
    number = int.from_bytes(data, "big")
    digits = []
    while number:
        number, digit = divmod(number, 58)
        digits.append(_BASE58_ALPHABET[digit])
    return "1" * zeros + "".join(reversed(digits))


def base58_decode(text: str) -> bytes:
    number = 0
    for char in text:
        digit = _BASE58_INDEX.get(char)
        if digit is None:
            raise ValueError(f"{char!r} is not a base58 digit")
        number = number * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\0" * zeros + body


class PeerId(bytes):
    """A peer id's bytes, printed in base58 as libp2p prints it.

    A ``bytes`` subclass, so it equals and hashes like the raw id (and like libp2p's ``ID``
    of the same bytes, which compares equal to bytes).
    """

    @classmethod
    def from_base58(cls, text: str) -> PeerId:
        if not text or len(text) > 2 * MAX_PEER_ID_SIZE:
            raise ValueError("not a peer id")
        return cls(base58_decode(text))

    @classmethod
    def of_public_key(cls, public_bytes: bytes) -> PeerId:
        if len(public_bytes) != PUBLIC_KEY_SIZE:
            raise ValueError("an ed25519 public key is 32 bytes")
        return cls(_ED25519_PEER_ID_PREFIX + public_bytes)

    def to_bytes(self) -> bytes:
        return bytes(self)

    def to_base58(self) -> str:
        return base58_encode(self)

    def __str__(self) -> str:
        return self.to_base58()

    def __repr__(self) -> str:
        return f"PeerId({self.to_base58()})"


@dataclass(frozen=True)
class Identity:
    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def seed(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    @property
    def public_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def peer_id(self) -> PeerId:
        return PeerId.of_public_key(self.public_bytes)

    @property
    def peer_id_bytes(self) -> bytes:
        return bytes(self.peer_id)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    def to_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _square_root(value: int) -> int | None:
    """A square root modulo the field prime (p = 5 mod 8), or None where there is none."""
    p = _FIELD_PRIME
    root = pow(value, (p + 3) // 8, p)
    if root * root % p != value % p:
        root = root * pow(2, (p - 1) // 4, p) % p
    return root if root * root % p == value % p else None


def _small_order_ys() -> frozenset[int]:
    """The y-coordinates of the curve's eight points of order dividing 8.

    Order 1 and 2: y = 1 and y = -1 (x = 0); order 4: y = 0. An order-8 point P has 2P of
    order 4, so y(2P) = 0, which on -x^2 + y^2 = 1 + d x^2 y^2 gives x^2 = -y^2 and
    d y^4 + 2 y^2 - 1 = 0: y^2 = (-1 +- sqrt(1 + d)) / d, of which one is a square.
    """
    p = _FIELD_PRIME
    d = -121665 * pow(121666, -1, p) % p
    ys = {0, 1, p - 1}
    root_of_1_plus_d = _square_root(1 + d)
    assert root_of_1_plus_d is not None
    for sign in (1, -1):
        y_squared = (-1 + sign * root_of_1_plus_d) * pow(d, -1, p) % p
        y = _square_root(y_squared)
        if y is not None:
            ys.update({y, p - y})
    assert len(ys) == 5
    return frozenset(ys)


_SMALL_ORDER_YS = _small_order_ys()


def has_small_order(public_bytes: bytes) -> bool:
    """Whether a 32-byte ed25519 public key encodes a point of order 1, 2, 4 or 8.

    For such a key, a signature (R = the identity point, S = 0) verifies for every message, and
    OpenSSL does not refuse the key, so anyone could sign as that peer id. Non-canonical
    encodings (y >= p) are reduced first, and the sign bit of x is ignored, so each of the 14
    encodings of these points is caught; libsodium refuses the same keys.
    """
    y = int.from_bytes(public_bytes, "little") & _Y_MASK
    return y % _FIELD_PRIME in _SMALL_ORDER_YS


def verify(public_bytes: bytes, data: bytes, signature: bytes) -> bool:
    if len(public_bytes) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    if has_small_order(public_bytes):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_bytes).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def public_key_of(peer_id_bytes: bytes) -> bytes | None:
    """The ed25519 public key embedded in a peer id, or None if it embeds no ed25519 key.

    Only the canonical encoding is accepted: the one every libp2p implementation writes.
    """
    if len(peer_id_bytes) != ED25519_PEER_ID_SIZE:
        return None
    if not peer_id_bytes.startswith(_ED25519_PEER_ID_PREFIX):
        return None
    return bytes(peer_id_bytes[len(_ED25519_PEER_ID_PREFIX) :])


def verify_by_peer(peer_id_bytes: bytes, data: bytes, signature: bytes) -> bool:
    public = public_key_of(peer_id_bytes)
    return public is not None and verify(public, data, signature)


def write_identity(path: Path, identity: Identity, *, force: bool = False) -> None:
    """Write a key file with mode 0600. Refuses to replace an existing file unless ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, identity.to_pem())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_identity(path: Path) -> Identity:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read identity {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, an ed25519 key is required")
    return Identity(key)


def load_or_create_identity(path: Path) -> Identity:
    path = Path(path)
    if path.exists():
        return load_identity(path)
    identity = Identity.generate()
    write_identity(path, identity)
    return identity
