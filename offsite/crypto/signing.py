"""Ed25519 signatures over bytes: what signs bundle manifests (the caller picks the bytes).

A signature is the 64 raw bytes Ed25519 produces; a public key is its 32 raw bytes, which is how
nodes pin the coordinator's bundle-signing key. Verification failures of every kind — a
tampered message or signature, another key, a malformed key — are one ``SignatureError``.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from offsite.crypto.errors import SignatureError
from offsite.crypto.keys import SigningKey

SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32


def sign(key: SigningKey, message: bytes) -> bytes:
    """The Ed25519 signature (64 bytes) of ``message``."""
    return key.sign(message)


def verify(public_key: bytes, signature: bytes, message: bytes) -> None:
    """``SignatureError`` unless ``signature`` is ``public_key``'s (raw 32 bytes) signature of
    ``message``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError) as err:
        raise SignatureError("the signature does not verify with the given public key") from err
