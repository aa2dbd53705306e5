"""Key agreement, key derivation and ciphers: the primitives secure aggregation is built from.

X25519 agrees a pairwise secret, HKDF-SHA256 turns secrets into keys, AES-256-GCM encrypts the
key shares clients route through the server, and AES-256-CTR over zeros is the mask PRG's
keystream. The protocol (who agrees with whom, which labels) is ``offsite.federation.secagg``'s.
"""

from __future__ import annotations

from typing import TypeAlias

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from offsite.crypto.errors import CryptoError

AgreementKey: TypeAlias = X25519PrivateKey
"""An X25519 private key (one round's, kept on the node)."""


def generate_agreement_key() -> AgreementKey:
    """A fresh X25519 private key."""
    return X25519PrivateKey.generate()


def agreement_key_from_bytes(raw: bytes) -> AgreementKey:
    """The X25519 private key whose raw 32 bytes are ``raw``."""
    return X25519PrivateKey.from_private_bytes(raw)


def agreement_private_bytes(key: AgreementKey) -> bytes:
    """The raw 32 bytes of an X25519 private key (secret: never leaves the node in the clear)."""
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def agreement_public_bytes(key: AgreementKey) -> bytes:
    """The raw 32 bytes of an X25519 key's public half."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def agree(key: AgreementKey, peer_public: bytes) -> bytes:
    """The raw X25519 shared secret of ``key`` and a peer's raw public key."""
    return key.exchange(X25519PublicKey.from_public_bytes(peer_public))


def hkdf_sha256(secret: bytes, info: bytes, length: int = 32) -> bytes:
    """``length`` bytes derived from ``secret`` for purpose ``info`` (HKDF-SHA256, no salt)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def aes_ctr_keystream(key: bytes, length: int) -> bytes:
    """``length`` bytes of AES-CTR keystream under ``key`` from a zero counter block."""
    encryptor = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
    return encryptor.update(b"\0" * length) + encryptor.finalize()


def aead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-GCM ciphertext with its tag appended."""
    return AESGCM(key).encrypt(nonce, plaintext, associated)


def aead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    """The plaintext of an AES-GCM ciphertext; ``CryptoError`` when it was altered, is
    addressed to another key or associated data, or is malformed."""
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, associated)
    except (InvalidTag, ValueError) as err:
        raise CryptoError("the ciphertext does not decrypt") from err
