"""Key pairs: generation, PEM / OpenSSH encodings, safe storage and SSH-style fingerprints.

Decisions:
- Private keys are stored unencrypted PKCS#8 PEM (OpenSSH format for the Flower SuperNode key,
  which Flower reads with ssh tooling), written 0600 and atomically (``offsite.host.files``); the
  folder's owner is the only protection, as for ``ssh``'s own keys.
- Curves are the caller's policy (``generate_ec_key`` takes the name); only NIST curves Flower
  accepts for SuperNode keys are known here.
- Keys cross this package's boundary as the library's objects under the aliases below, so a
  caller can hold, sign with or store a key without importing ``cryptography`` itself.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Literal, TypeAlias

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from offsite.crypto.errors import CryptoError
from offsite.host.files import write_private

EcPrivateKey: TypeAlias = ec.EllipticCurvePrivateKey
"""An ECDSA private key (TLS keys P-256, Flower SuperNode keys P-384)."""
SigningKey: TypeAlias = Ed25519PrivateKey
"""An Ed25519 private key: signs bundle manifests and Flower apps."""
PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | Ed25519PrivateKey
"""Any private key this package loads from PEM (and can issue certificates with)."""

Curve = Literal["secp256r1", "secp384r1", "secp521r1"]
# NIST curves Flower accepts for SuperNode keys, minus the two below 128-bit security.
FLOWER_KEY_CURVES: tuple[Curve, ...] = ("secp256r1", "secp384r1", "secp521r1")
_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "secp256r1": ec.SECP256R1,
    "secp384r1": ec.SECP384R1,
    "secp521r1": ec.SECP521R1,
}


def generate_ec_key(curve: Curve = "secp256r1") -> EcPrivateKey:
    """A fresh ECDSA private key on ``curve``."""
    return ec.generate_private_key(_CURVES[curve]())


def generate_signing_key() -> SigningKey:
    """A fresh Ed25519 private key."""
    return Ed25519PrivateKey.generate()


def private_key_pem(key: PrivateKey) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM (``-----BEGIN PRIVATE KEY-----``)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_private_key(path: Path, key: PrivateKey) -> None:
    """Store ``key`` as PKCS#8 PEM, readable by its owner only (0600), atomically."""
    write_private(path, private_key_pem(key))


def load_private_key(pem: bytes) -> PrivateKey:
    """A PEM private key (unencrypted); ``ValueError`` from the library when it is no PEM key,
    ``CryptoError`` when it is a kind this package does not use (DSA, X448, ...)."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | Ed25519PrivateKey):
        raise CryptoError(f"unsupported private key type {type(key).__name__}")
    return key


def load_signing_key(pem: bytes) -> SigningKey:
    """A PEM Ed25519 private key; ``CryptoError`` when the PEM holds another kind of key."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise CryptoError("not an Ed25519 key")
    return key


def raw_public_key(key: SigningKey) -> bytes:
    """The 32-byte raw public half of an Ed25519 key (what bundle verification takes)."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def openssh_public_key(key: EcPrivateKey | SigningKey) -> bytes:
    """The public half as one OpenSSH line (``ecdsa-sha2-nistp384 AAAA…``), no comment, no
    newline."""
    return key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )


def openssh_private_key(key: EcPrivateKey) -> bytes:
    """``key`` unencrypted in OpenSSH's private format (``BEGIN OPENSSH PRIVATE KEY``)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def ssh_fingerprint(openssh: str) -> str:
    """``SHA256:…`` of an OpenSSH public key, as ``ssh-keygen -l`` prints it."""
    blob = base64.b64decode(openssh.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def ed25519_public_key_from_pem(pem: bytes) -> bytes:
    """The raw 32 bytes of a PEM ``PUBLIC KEY``; ``ValueError`` from the library when it is no
    PEM public key, ``CryptoError`` when it is not Ed25519."""
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise CryptoError("not an Ed25519 public key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def parse_flower_public_key(openssh: bytes | str) -> bytes:
    """A SuperNode authentication key (OpenSSH ECDSA on a NIST curve), as Flower stores it
    (PEM SubjectPublicKeyInfo); CryptoError (a ValueError) saying what is wrong otherwise."""
    data = openssh.encode() if isinstance(openssh, str) else bytes(openssh)
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm) as err:
        raise CryptoError(f"the Flower public key is not an OpenSSH public key ({err})") from err
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in FLOWER_KEY_CURVES:
        raise CryptoError("the Flower public key must be ECDSA on " + ", ".join(FLOWER_KEY_CURVES))
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def canonical_flower_key(openssh: bytes | str) -> str:
    """A SuperNode key in one spelling (OpenSSH, no comment), so equal keys compare equal."""
    key = serialization.load_pem_public_key(parse_flower_public_key(openssh))
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
