"""Certificate fingerprints and SuperNode key checks: what coordinator and nodes both compare."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes


def fingerprint(cert_pem: bytes) -> str:
    """sha256 of a PEM certificate's DER encoding (what ``--ca-fingerprint`` pins)."""
    return x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256()).hex()


# NIST curves Flower accepts for SuperNode keys, minus the two below 128-bit security.
FLOWER_KEY_CURVES = ("secp256r1", "secp384r1", "secp521r1")


def canonical_flower_key(openssh: bytes | str) -> str:
    """A SuperNode key in one spelling (OpenSSH, no comment), so equal keys compare equal."""
    from cryptography.hazmat.primitives import serialization

    pem = parse_flower_public_key(openssh)
    key = serialization.load_pem_public_key(pem)
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


def parse_flower_public_key(openssh: bytes | str) -> bytes:
    """A SuperNode authentication key (OpenSSH ECDSA on a NIST curve), as Flower stores it
    (PEM SubjectPublicKeyInfo); ValueError saying what is wrong otherwise."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    data = openssh.encode() if isinstance(openssh, str) else bytes(openssh)
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm) as err:
        raise ValueError(f"the Flower public key is not an OpenSSH public key ({err})") from err
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in FLOWER_KEY_CURVES:
        raise ValueError("the Flower public key must be ECDSA on " + ", ".join(FLOWER_KEY_CURVES))
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
