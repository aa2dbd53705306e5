"""The coordinator's gRPC handlers, called directly: a real registry, PKI and files, no gRPC.

Each refusal is checked for the status the caller gets; the thin servicers only translate it
(the loopback tests in test_service.py and test_enrollment.py cover that path end to end).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from coordinator.service.artifact_files import CHUNK, ArtifactFiles
from coordinator.service.audit import Audit
from coordinator.service.handlers import (
    ENROLL_ATTEMPTS,
    RENEWALS,
    ArtifactHandler,
    EnrollmentHandler,
    NodeHandler,
)
from coordinator.service.pki import Pki, init_pki
from coordinator.store import Store, open_store
from offsite.crypto import canonical_flower_key, fingerprint
from offsite.errors import OffsiteError
from offsite.wire.domain import (
    DownloadRequest,
    EnrollRequest,
    Peer,
    Refused,
    RenewFlowerKeyRequest,
    StatRequest,
    Status,
)

NODE = Peer("10.0.0.5", "ff" * 32)  # the certificate fingerprint "x" enrolled with


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    opened = open_store(tmp_path)
    opened.enroll(opened.mint_token(), "x", NODE.fingerprint or "", "")
    return opened


@pytest.fixture()
def pki(tmp_path: Path) -> Pki:
    return init_pki(tmp_path / "pki", ["localhost"])


def _status(call: Callable[[], object]) -> Status:
    """The status ``call()`` was refused with."""
    with pytest.raises(Refused) as refused:
        call()
    return refused.value.status


def _csr(name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM)


def _flower_key() -> bytes:
    return (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )


# ---------------------------------------------------------------- artifacts


@pytest.fixture()
def artifacts(tmp_path: Path, store: Store) -> tuple[ArtifactHandler, str, bytes]:
    files = ArtifactFiles(tmp_path / "artifacts")
    data = os.urandom(2 * CHUNK + 123)
    digest = hashlib.sha256(data).hexdigest()
    files.path(digest).write_bytes(data)
    store.put_artifact(digest, "adapter", len(data), files.path(digest))
    return ArtifactHandler(store, files), digest, data


def test_an_enrolled_node_stats_and_downloads_from_any_offset(
    artifacts: tuple[ArtifactHandler, str, bytes],
) -> None:
    handler, digest, data = artifacts
    stat = handler.stat(NODE, StatRequest(digest))
    assert (stat.digest, stat.kind, stat.size, stat.chunk_size) == (
        digest,
        "adapter",
        len(data),
        CHUNK,
    )
    chunks = list(handler.download(NODE, DownloadRequest(digest, offset=CHUNK + 7)))
    assert [c.offset for c in chunks] == [CHUNK + 7, 2 * CHUNK + 7]
    assert b"".join(c.data for c in chunks) == data[CHUNK + 7 :]
    assert list(handler.download(NODE, DownloadRequest(digest, offset=len(data)))) == []


def test_artifact_calls_are_refused_with_precise_statuses(
    artifacts: tuple[ArtifactHandler, str, bytes], store: Store
) -> None:
    handler, digest, data = artifacts
    assert _status(lambda: handler.stat(Peer("10.0.0.5"), StatRequest(digest))) == (
        Status.UNAUTHENTICATED
    )
    stranger = Peer("10.0.0.6", "ee" * 32)
    assert _status(lambda: handler.stat(stranger, StatRequest(digest))) == Status.PERMISSION_DENIED
    assert _status(lambda: handler.stat(NODE, StatRequest("AB" * 32))) == Status.INVALID_ARGUMENT
    assert _status(lambda: handler.stat(NODE, StatRequest("ab" * 32))) == Status.NOT_FOUND
    beyond = DownloadRequest(digest, offset=len(data) + 1)
    with pytest.raises(Refused, match=f"offset beyond {len(data)} bytes") as refused:
        handler.download(NODE, beyond)  # refused before an iterator exists
    assert refused.value.status == Status.OUT_OF_RANGE
    assert store.revoke("x")
    assert _status(lambda: handler.stat(NODE, StatRequest(digest))) == Status.PERMISSION_DENIED


def test_without_tls_artifacts_are_served_to_anyone(
    artifacts: tuple[ArtifactHandler, str, bytes],
) -> None:
    handler, digest, data = artifacts
    handler.require_node = False
    assert handler.stat(Peer("127.0.0.1"), StatRequest(digest)).size == len(data)


# ---------------------------------------------------------------- enrollment


def _request(token: str, name: str = "clinic-a", **changes: object) -> EnrollRequest:
    fields: dict[str, object] = {
        "token": token,
        "node_name": name,
        "csr_pem": _csr(name),
        "flower_public_key": _flower_key(),
    }
    return EnrollRequest(**{**fields, **changes})


def test_a_good_token_and_csr_get_a_certificate_and_the_coordinators_keys(
    tmp_path: Path, store: Store, pki: Pki
) -> None:
    audit = Audit(tmp_path)
    handler = EnrollmentHandler(store, pki, audit)
    handler.artifact_port, handler.superlink_port = 9302, 9092
    enrolled: list[str] = []
    handler.on_enrolled = lambda: enrolled.append("called")
    request = _request(store.mint_token())
    grant = handler.enroll(Peer("10.0.0.7"), request)
    assert grant.ca_certificate_pem == pki.ca_cert.read_bytes()
    assert (grant.artifact_port, grant.superlink_port) == (9302, 9092)
    assert len(grant.signing_public_key) == 32 and grant.app_signing_key_id.startswith("fpk_")
    node = store.node(name="clinic-a")
    assert node is not None and node.fingerprint == fingerprint(grant.certificate_pem)
    stored = {k.name: k.public_key for k in store.flower_keys()}["clinic-a"]
    assert stored == canonical_flower_key(request.flower_public_key)
    assert enrolled == ["called"]
    assert [e["event"] for e in audit.entries()] == ["enrolled"]


def test_bad_requests_and_tokens_are_refused_and_audited(
    tmp_path: Path, store: Store, pki: Pki
) -> None:
    audit = Audit(tmp_path)
    handler = EnrollmentHandler(store, pki, audit)
    token = store.mint_token()
    bad_key = _request(token, flower_public_key=b"not a key")
    assert _status(lambda: handler.enroll(Peer("10.0.0.7"), bad_key)) == Status.INVALID_ARGUMENT
    bad_name = _request(token, name="clinic/a")
    assert _status(lambda: handler.enroll(Peer("10.0.0.7"), bad_name)) == Status.INVALID_ARGUMENT
    unknown = _request("made-up")
    assert _status(lambda: handler.enroll(Peer("10.0.0.7"), unknown)) == Status.PERMISSION_DENIED
    handler.enroll(Peer("10.0.0.7"), _request(token))  # the refusals left the token unused
    assert [e["event"] for e in audit.entries()] == ["enrollment-refused"] * 3 + ["enrolled"]
    assert audit.entries()[2]["peer"] == "10.0.0.7"
    assert token not in audit.path.read_text()


def test_enrollment_attempts_are_limited_per_address(store: Store, pki: Pki) -> None:
    handler = EnrollmentHandler(store, pki)
    guess = _request("guess")
    for _ in range(ENROLL_ATTEMPTS[0]):
        assert _status(lambda: handler.enroll(Peer("10.0.0.8"), guess)) == Status.PERMISSION_DENIED
    assert _status(lambda: handler.enroll(Peer("10.0.0.8"), guess)) == Status.RESOURCE_EXHAUSTED
    # another address is not held back by the first one's flood
    assert _status(lambda: handler.enroll(Peer("10.0.0.9"), guess)) == Status.PERMISSION_DENIED


# ---------------------------------------------------------------- node key renewal


def test_a_renewal_is_decided_by_the_renew_callback(store: Store) -> None:
    handler = NodeHandler(store)
    request = RenewFlowerKeyRequest(_flower_key())
    assert _status(lambda: handler.renew_flower_key(NODE, request)) == Status.FAILED_PRECONDITION
    asked: list[tuple[str, str]] = []

    def renew(name: str, key: str) -> bool:
        asked.append((name, key))
        return True

    handler.renew = renew
    assert handler.renew_flower_key(NODE, request).renewed is True
    assert asked == [("x", canonical_flower_key(request.flower_public_key))]
    handler.renew = lambda name, key: False
    assert handler.renew_flower_key(NODE, request).renewed is False


def test_renewals_are_refused_with_precise_statuses(store: Store) -> None:
    handler = NodeHandler(store)
    request = RenewFlowerKeyRequest(_flower_key())
    handler.renew = lambda name, key: True
    assert _status(lambda: handler.renew_flower_key(Peer("h"), request)) == Status.UNAUTHENTICATED
    garbage = RenewFlowerKeyRequest(b"\xff not a key")
    assert _status(lambda: handler.renew_flower_key(NODE, garbage)) == Status.INVALID_ARGUMENT

    def unreachable(name: str, key: str) -> bool:
        raise OffsiteError("the SuperLink's Control API refused or failed: down")

    handler.renew = unreachable
    with pytest.raises(Refused, match="Control API refused") as refused:
        handler.renew_flower_key(NODE, request)
    assert refused.value.status == Status.UNAVAILABLE
    handler.renew = lambda name, key: True
    for _ in range(RENEWALS[0] - 2):  # the garbage and the failed call counted for the node
        handler.renew_flower_key(NODE, request)
    assert _status(lambda: handler.renew_flower_key(NODE, request)) == Status.RESOURCE_EXHAUSTED
    assert store.revoke("x")
    assert _status(lambda: handler.renew_flower_key(NODE, request)) == Status.PERMISSION_DENIED
