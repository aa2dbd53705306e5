"""Certificate fingerprints, the one identity both coordinator and nodes compare."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes


def fingerprint(cert_pem: bytes) -> str:
    """sha256 of a PEM certificate's DER encoding (what ``--ca-fingerprint`` pins)."""
    return x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256()).hex()
