"""Peer identity: an ed25519 key whose libp2p peer id is the peer's name in the swarm.

Keys are stored as unencrypted PKCS#8 PEM, file mode 0600. An ed25519 peer id embeds the
public key (identity multihash), so a signature can be checked against a peer id alone.
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
from libp2p.crypto.ed25519 import Ed25519PublicKey as Libp2pEd25519PublicKey
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.peer.id import ID

from dandelion_p2p.errors import ConfigError

SIGNATURE_SIZE = 64
PUBLIC_KEY_SIZE = 32


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
    def peer_id(self) -> ID:
        return ID.from_pubkey(Libp2pEd25519PublicKey.from_bytes(self.public_bytes))

    @property
    def peer_id_bytes(self) -> bytes:
        return self.peer_id.to_bytes()

    def key_pair(self) -> KeyPair:
        return create_new_key_pair(self.seed)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    def to_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def verify(public_bytes: bytes, data: bytes, signature: bytes) -> bool:
    if len(public_bytes) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_bytes).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def public_key_of(peer_id_bytes: bytes) -> bytes | None:
    """The ed25519 public key embedded in a peer id, or None if it embeds no ed25519 key."""
    try:
        key = ID(peer_id_bytes).extract_public_key()
    except Exception:
        return None
    if key is None or key.get_type() != KeyType.Ed25519:
        return None
    raw = key.to_bytes()
    return raw if len(raw) == PUBLIC_KEY_SIZE else None


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
