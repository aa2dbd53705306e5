"""offsite.crypto: the one owner of the ``cryptography`` library, with real keys (no mocks).

Known-answer vectors come from the RFCs (RFC 8032 Ed25519 test 1, RFC 7748 X25519, RFC 5869
HKDF test 3) and ``ssh-keygen -l``, so a change of encoding or algorithm cannot pass unnoticed.
"""

from __future__ import annotations

import ast
import hashlib
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from offsite import crypto
from offsite.crypto import CryptoError, SignatureError

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("offsite", "coordinator", "client", "emulator", "bench")
OWNER = ROOT / "offsite" / "crypto"

# RFC 8032, 7.1 test 1, stored as ``offsite coordinator init`` writes keys (PKCS#8 PEM)
RFC8032_KEY_PEM = (
    b"-----BEGIN PRIVATE KEY-----\n"
    b"MC4CAQAwBQYDK2VwBCIEIJ1hsZ3v/VpguoRK9JLsLMREScVpezJpGXA7rAMcrn9g\n"
    b"-----END PRIVATE KEY-----\n"
)
RFC8032_PUBLIC = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
RFC8032_SIGNATURE_OF_EMPTY = (
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
    "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)
RFC8032_OPENSSH = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINdamAGCsQq31Uv+08lkBzoO4XLz2qYjJa8CGmj3B1Ea"
RFC8032_SSH_FINGERPRINT = "SHA256:bbXpuKG6zhzdmnxq256TlqzFBzRl2f6OOg722cYNbU8"  # ssh-keygen -l


def _cryptography_imports(path: Path) -> bool:
    """Whether ``path`` imports ``cryptography`` anywhere (top level or inside a function)."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return "cryptography" in roots


def test_only_the_crypto_package_imports_cryptography() -> None:
    """Every key, certificate, signature and cipher goes through ``offsite.crypto``."""
    offenders = [
        path.relative_to(ROOT).as_posix()
        for package in SCANNED
        for path in sorted((ROOT / package).rglob("*.py"))
        if not path.is_relative_to(OWNER) and _cryptography_imports(path)
    ]
    assert not offenders, f"import cryptography only inside offsite/crypto: {offenders}"
    assert _cryptography_imports(OWNER / "keys.py")  # the scan does see imports


# ---------------------------------------------------------------- signing


def test_sign_matches_rfc8032_and_verifies() -> None:
    key = crypto.load_signing_key(RFC8032_KEY_PEM)
    assert crypto.raw_public_key(key).hex() == RFC8032_PUBLIC
    signature = crypto.sign(key, b"")
    assert signature.hex() == RFC8032_SIGNATURE_OF_EMPTY
    assert len(signature) == crypto.SIGNATURE_BYTES
    crypto.verify(bytes.fromhex(RFC8032_PUBLIC), signature, b"")


def test_sign_verify_round_trip_with_a_fresh_key() -> None:
    key = crypto.generate_signing_key()
    public = crypto.raw_public_key(key)
    assert len(public) == crypto.PUBLIC_KEY_BYTES
    crypto.verify(public, crypto.sign(key, b"manifest"), b"manifest")


@pytest.mark.parametrize("what", ["message", "signature", "key", "short key"])
def test_verify_rejects_tampering_and_other_keys(what: str) -> None:
    key = crypto.generate_signing_key()
    public, message = crypto.raw_public_key(key), b'{"format":"offsite-bundle/1"}'
    signature = crypto.sign(key, message)
    if what == "message":
        message = message.replace(b"1", b"2")
    elif what == "signature":
        signature = bytes([signature[0] ^ 1]) + signature[1:]
    elif what == "key":
        public = crypto.raw_public_key(crypto.generate_signing_key())
    else:
        public = public[:31]
    with pytest.raises(SignatureError, match="does not verify"):
        crypto.verify(public, signature, message)


# ---------------------------------------------------------------- keys


def test_pkcs8_files_written_before_still_load_byte_for_byte(tmp_path: Path) -> None:
    key = crypto.load_signing_key(RFC8032_KEY_PEM)
    assert crypto.private_key_pem(key) == RFC8032_KEY_PEM
    crypto.write_private_key(tmp_path / "signing.key", key)
    assert (tmp_path / "signing.key").read_bytes() == RFC8032_KEY_PEM


def test_private_keys_are_written_0600_even_over_a_readable_file(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "ca.key"
    path.parent.mkdir()
    path.write_bytes(b"old")
    path.chmod(0o644)
    key = crypto.generate_ec_key()
    crypto.write_private_key(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list(path.parent.glob("*.tmp"))
    loaded = crypto.load_private_key(path.read_bytes())
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert loaded.private_numbers() == key.private_numbers()


@pytest.mark.parametrize("curve", ["secp256r1", "secp384r1", "secp521r1"])
def test_generate_ec_key_on_each_curve(curve: crypto.Curve) -> None:
    assert crypto.generate_ec_key(curve).curve.name == curve


def test_load_signing_key_refuses_other_key_types() -> None:
    pem = crypto.private_key_pem(crypto.generate_ec_key())
    with pytest.raises(CryptoError, match="not an Ed25519 key"):
        crypto.load_signing_key(pem)
    with pytest.raises(ValueError):
        crypto.load_signing_key(b"not a key")


def test_openssh_encodings_and_fingerprint_match_ssh_keygen() -> None:
    key = crypto.load_signing_key(RFC8032_KEY_PEM)
    assert crypto.openssh_public_key(key).decode() == RFC8032_OPENSSH
    assert crypto.ssh_fingerprint(RFC8032_OPENSSH) == RFC8032_SSH_FINGERPRINT
    assert crypto.ssh_fingerprint(RFC8032_OPENSSH + " a comment") == RFC8032_SSH_FINGERPRINT
    flower = crypto.generate_ec_key("secp384r1")
    assert crypto.openssh_private_key(flower).startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    loaded = serialization.load_ssh_private_key(crypto.openssh_private_key(flower), None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert loaded.private_numbers() == flower.private_numbers()


def test_ed25519_public_key_from_pem() -> None:
    key = crypto.generate_signing_key()
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert crypto.ed25519_public_key_from_pem(pem) == crypto.raw_public_key(key)
    other = (
        crypto.generate_ec_key()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(CryptoError, match="not an Ed25519 public key"):
        crypto.ed25519_public_key_from_pem(other)


def test_flower_keys_are_canonical_and_only_nist_ecdsa() -> None:
    key = crypto.generate_ec_key("secp384r1")
    openssh = crypto.openssh_public_key(key)
    canonical = crypto.canonical_flower_key(b"  " + openssh + b" node-1@host\n")
    assert canonical == openssh.decode() == crypto.canonical_flower_key(openssh.decode())
    pem = crypto.parse_flower_public_key(openssh)
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    rsa_openssh = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    cases: list[tuple[bytes | str, str]] = [
        (RFC8032_OPENSSH, "must be ECDSA on secp256r1, secp384r1, secp521r1"),
        (rsa_openssh, "must be ECDSA on secp256r1, secp384r1, secp521r1"),
        (b"ssh-rsa AAAA", "is not an OpenSSH public key"),
    ]
    for bad, message in cases:
        with pytest.raises(CryptoError, match=message):
            crypto.parse_flower_public_key(bad)


# ---------------------------------------------------------------- certificates


@pytest.fixture(scope="module")
def ca() -> tuple[crypto.EcPrivateKey, bytes]:
    key = crypto.generate_ec_key()
    return key, crypto.self_signed_ca(key, "Test CA", days=30)


def test_self_signed_ca_is_a_ca_that_signs_end_entities_only(
    ca: tuple[crypto.EcPrivateKey, bytes],
) -> None:
    _, pem = ca
    cert = x509.load_pem_x509_certificate(pem)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Test CA"
    assert crypto.is_ca(pem)
    crypto.verify_issued_by(pem, pem)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.days == 30 and lifetime.seconds == 300  # valid from five minutes ago


def test_fingerprint_is_the_sha256_of_the_der_and_stable(
    ca: tuple[crypto.EcPrivateKey, bytes],
) -> None:
    key, pem = ca
    der = ssl.PEM_cert_to_DER_cert(pem.decode())
    assert crypto.fingerprint(pem) == hashlib.sha256(der).hexdigest()
    assert crypto.fingerprint(pem) == crypto.fingerprint(bytes(pem))
    assert crypto.fingerprint(pem) != crypto.fingerprint(crypto.self_signed_ca(key, "Test CA", 30))


def test_server_certificate_names_ips_and_hosts(ca: tuple[crypto.EcPrivateKey, bytes]) -> None:
    ca_key, ca_pem = ca
    server_key = crypto.generate_ec_key()
    pem = crypto.issue_server_certificate(
        ca_key, ca_pem, server_key, "coord.example", ["localhost", "127.0.0.1", "::1"], days=5
    )
    cert = x509.load_pem_x509_certificate(pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.public_key() == server_key.public_key()
    assert not crypto.is_ca(pem)
    crypto.verify_issued_by(pem, ca_pem)
    other_ca = crypto.self_signed_ca(crypto.generate_ec_key(), "Test CA", 30)  # same name
    with pytest.raises(CryptoError, match="not issued by the given CA"):
        crypto.verify_issued_by(pem, other_ca)


def test_csr_round_trip_and_client_certificate(ca: tuple[crypto.EcPrivateKey, bytes]) -> None:
    ca_key, ca_pem = ca
    node_key = crypto.generate_ec_key()
    csr = crypto.load_certificate_request(crypto.certificate_request(node_key, "node-1"))
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node-1"
    pem = crypto.issue_client_certificate(ca_key, ca_pem, csr, "node-1", days=7)
    cert = x509.load_pem_x509_certificate(pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node-1"
    assert cert.public_key() == node_key.public_key()
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not crypto.is_ca(pem)
    crypto.verify_issued_by(pem, ca_pem)
    # a CA loaded back from its PEM file issues alike
    loaded = crypto.load_private_key(crypto.private_key_pem(ca_key))
    crypto.verify_issued_by(crypto.issue_client_certificate(loaded, ca_pem, csr, "n", 1), ca_pem)


def _foreign_csr(key: rsa.RSAPrivateKey | Ed25519PrivateKey) -> bytes:
    algorithm = None if isinstance(key, Ed25519PrivateKey) else hashes.SHA256()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node")]))
        .sign(key, algorithm)
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def test_csr_checks_refuse_garbage_forgeries_and_weak_keys() -> None:
    with pytest.raises(CryptoError, match="the certificate request is not a PEM CSR: "):
        crypto.load_certificate_request(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n")
    good = crypto.certificate_request(crypto.generate_ec_key(), "node")
    der = bytearray(x509.load_pem_x509_csr(good).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 1  # inside the signature
    forged = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CryptoError, match="signature does not verify"):
        crypto.load_certificate_request(forged)
    strong_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    crypto.load_certificate_request(_foreign_csr(strong_rsa))
    for weak in (
        rsa.generate_private_key(public_exponent=65537, key_size=1024),
        Ed25519PrivateKey.generate(),
    ):
        with pytest.raises(CryptoError, match=r"must be ECDSA \(P-256 or larger\) or RSA-2048\+"):
            crypto.load_certificate_request(_foreign_csr(weak))


# ---------------------------------------------------------------- key agreement and ciphers


def test_x25519_matches_rfc7748_and_round_trips() -> None:
    alice = crypto.agreement_key_from_bytes(
        bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    )
    bob_public = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    assert crypto.agreement_public_bytes(alice).hex() == (
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
    assert crypto.agree(alice, bytes.fromhex(bob_public)).hex() == (
        "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    )
    one, two = crypto.generate_agreement_key(), crypto.generate_agreement_key()
    assert crypto.agree(one, crypto.agreement_public_bytes(two)) == crypto.agree(
        two, crypto.agreement_public_bytes(one)
    )
    copy = crypto.agreement_key_from_bytes(crypto.agreement_private_bytes(one))
    assert crypto.agreement_public_bytes(copy) == crypto.agreement_public_bytes(one)


def test_hkdf_matches_rfc5869_and_ctr_keystream_is_deterministic() -> None:
    assert crypto.hkdf_sha256(b"\x0b" * 22, b"", 42).hex() == (
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )
    key = crypto.hkdf_sha256(b"seed", b"label")
    stream = crypto.aes_ctr_keystream(key, 40)
    assert len(stream) == 40 and stream == crypto.aes_ctr_keystream(key, 40)
    assert crypto.aes_ctr_keystream(key, 16) == stream[:16]
    assert stream != crypto.aes_ctr_keystream(crypto.hkdf_sha256(b"seed", b"other"), 40)


def test_aead_round_trip_and_refusals() -> None:
    key, nonce = crypto.hkdf_sha256(b"shared", b"channel"), b"\1" * 12
    box = crypto.aead_encrypt(key, nonce, b"shares", b"1->2")
    assert crypto.aead_decrypt(key, nonce, box, b"1->2") == b"shares"
    tampered = bytes([box[0] ^ 1]) + box[1:]
    for args in (
        (key, nonce, tampered, b"1->2"),
        (key, nonce, box, b"2->1"),
        (crypto.hkdf_sha256(b"other", b"channel"), nonce, box, b"1->2"),
        (key, b"", box, b"1->2"),
    ):
        with pytest.raises(CryptoError, match="does not decrypt"):
            crypto.aead_decrypt(*args)
