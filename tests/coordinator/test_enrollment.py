"""Enrollment hardening and node-side safety, on real gRPC servers on loopback.

Each test fails when its fix is reverted: the token is checked and the CSR and Flower key
validated before anything is signed; a join checks that the pinned certificate is a CA that
issued the server's certificate before the token leaves the node; an identity is never
overwritten; digests become paths only after they are checked; archive errors are one-line
integrity errors; every trust decision is in the audit log, without secrets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

import coordinator.service.handlers as handlers
from client.artifacts import fetch_bundle
from client.identity import JoinError, join
from coordinator.service.audit import Audit
from coordinator.service.pki import init_pki
from offsite.errors import IntegrityError
from offsite.wire.clients import EnrollmentClient
from offsite.wire.domain import EnrollGrant, EnrollRequest, Peer, Refused, Status
from offsite.wire.servicers import add_services
from tests.coordinator.test_service import Coordinator, _start


@pytest.fixture()
def coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    running = _start(tmp_path / "coordinator")
    yield running
    running.server.stop(None)


def _csr(name: str, key: object | None = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM)


def _flower_key() -> bytes:
    key = ec.generate_private_key(ec.SECP384R1())
    return key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )


def _enroll(coordinator: Coordinator, **fields: object) -> grpc.RpcError | None:
    credentials = grpc.ssl_channel_credentials(coordinator.pki.ca_cert.read_bytes())
    options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(coordinator.address, credentials, options=options) as channel:
        try:
            EnrollmentClient(channel).enroll(EnrollRequest(**fields), timeout=10)
        except grpc.RpcError as err:
            return err
    return None


@pytest.fixture()
def issued(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names the CA signed a certificate for (a spy on the one signing function)."""
    names: list[str] = []
    real = handlers.issue_certificate

    def spy(pki, csr_pem, node_name, days=365):
        names.append(node_name)
        return real(pki, csr_pem, node_name, days)

    monkeypatch.setattr(handlers, "issue_certificate", spy)
    return names


@pytest.mark.parametrize(
    "problem",
    [
        "not-ssh",
        "rsa-key",
        "ed25519-key",
        "garbage-csr",
        "csr-bad-signature",
        "rsa-1024-csr",
        "name-with-newline",
        "name-with-slash",
    ],
)
def test_a_bad_csr_or_flower_key_is_refused_before_the_token_is_used(
    coordinator: Coordinator, issued: list[str], problem: str
) -> None:
    token = coordinator.store.mint_token()
    csr, flower = _csr("clinic-a"), _flower_key()
    if problem == "not-ssh":
        flower = b"-----BEGIN PUBLIC KEY----- nonsense"
    elif problem == "rsa-key":
        flower = (
            rsa.generate_private_key(65537, 2048)
            .public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        )
    elif problem == "ed25519-key":
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        flower = (
            Ed25519PrivateKey.generate()
            .public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        )
    elif problem == "garbage-csr":
        csr = b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
    elif problem == "csr-bad-signature":
        text = bytearray(csr)
        middle = len(text) // 2
        text[middle] = ord("A") if text[middle] != ord("A") else ord("B")
        csr = bytes(text)
    elif problem == "rsa-1024-csr":
        csr = _csr("clinic-a", rsa.generate_private_key(65537, 1024))
    name = {"name-with-newline": "clinic-a\n", "name-with-slash": "clinic/a"}.get(problem)
    error = _enroll(
        coordinator,
        token=token,
        node_name=name or "clinic-a",
        csr_pem=csr,
        flower_public_key=flower,
    )
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert issued == [] and coordinator.store.nodes() == []
    # the token was not consumed: a correct request with it still enrolls
    assert (
        _enroll(
            coordinator,
            token=token,
            node_name="clinic-a",
            csr_pem=_csr("clinic-a"),
            flower_public_key=_flower_key(),
        )
        is None
    )
    assert issued == ["clinic-a"]


def test_a_bad_token_or_taken_name_gets_nothing_signed(
    coordinator: Coordinator, issued: list[str]
) -> None:
    fields = {
        "node_name": "clinic-a",
        "csr_pem": _csr("clinic-a"),
        "flower_public_key": _flower_key(),
    }
    for token in ("made-up", ""):
        error = _enroll(coordinator, token=token, **fields)
        assert error is not None and error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert issued == []
    assert _enroll(coordinator, token=coordinator.store.mint_token(), **fields) is None
    spare = coordinator.store.mint_token()
    error = _enroll(coordinator, token=spare, **{**fields, "csr_pem": _csr("clinic-a")})
    assert error is not None and "already enrolled" in error.details()
    assert issued == ["clinic-a"]  # the second clinic-a got no certificate
    # and its token survived the refusal
    renamed = {
        "node_name": "clinic-b",
        "csr_pem": _csr("clinic-b"),
        "flower_public_key": _flower_key(),
    }
    assert _enroll(coordinator, token=spare, **renamed) is None


def test_enrollments_and_refusals_are_audited_without_secrets(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    token = coordinator.store.mint_token()
    join(coordinator.address, token, coordinator.ca_fingerprint, "clinic-a", tmp_path / "a")
    with pytest.raises(JoinError):
        join(coordinator.address, token, coordinator.ca_fingerprint, "clinic-b", tmp_path / "b")
    audit = Audit(coordinator.state)
    events = [(e["event"], e.get("node") or e.get("claimed_node")) for e in audit.entries()]
    assert events == [("enrolled", "clinic-a"), ("enrollment-refused", "clinic-b")]
    assert audit.entries()[1]["peer"] == "127.0.0.1"
    assert "already used" in audit.entries()[1]["reason"]
    text = audit.path.read_text()
    assert token not in text and "PRIVATE KEY" not in text and "BEGIN" not in text
    assert oct(audit.path.stat().st_mode & 0o777) == "0o600"


def _fake_coordinator(tmp_path: Path, chain: bytes, key: bytes) -> tuple[grpc.Server, str, list]:
    """An enrollment server presenting ``chain``; records every Enroll it receives."""
    calls: list[str] = []

    class Recording:
        def enroll(self, peer: Peer, request: EnrollRequest) -> EnrollGrant:
            calls.append(request.token)
            raise Refused(Status.PERMISSION_DENIED, "no")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    add_services(server, enrollment=Recording())
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, chain)]))
    server.start()
    return server, f"127.0.0.1:{port}", calls


def test_join_checks_the_pinned_ca_before_the_token_leaves_the_node(tmp_path: Path) -> None:
    from offsite.crypto import fingerprint

    real = init_pki(tmp_path / "real", ["localhost"])
    impostor = init_pki(tmp_path / "impostor", ["localhost"])
    real_ca = real.ca_cert.read_bytes()
    impostor_leaf = impostor.server_cert.read_bytes().split(b"-----END CERTIFICATE-----")[0]
    impostor_leaf += b"-----END CERTIFICATE-----\n"
    # (1) the impostor shows the real CA next to its own leaf: the pinned CA did not sign it
    server, address, calls = _fake_coordinator(
        tmp_path, impostor_leaf + real_ca, impostor.server_key.read_bytes()
    )
    try:
        with pytest.raises(JoinError, match="not issued by the pinned CA"):
            join(address, "secret-token", fingerprint(real_ca), "clinic-a", tmp_path / "n1")
        # (2) pinning the leaf itself: not a CA
        with pytest.raises(JoinError, match="not a CA"):
            join(address, "secret-token", fingerprint(impostor_leaf), "clinic-a", tmp_path / "n2")
    finally:
        server.stop(None)
    assert calls == []  # the token never reached the impostor
    assert not (tmp_path / "n1").exists() and not (tmp_path / "n2").exists()


def test_join_never_overwrites_an_identity(coordinator: Coordinator, tmp_path: Path) -> None:
    folder = tmp_path / "node"
    identity = join(
        coordinator.address,
        coordinator.store.mint_token(),
        coordinator.ca_fingerprint,
        "clinic-a",
        folder,
    )
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    token = coordinator.store.mint_token()
    with pytest.raises(JoinError, match="already holds a node identity"):
        join(coordinator.address, token, coordinator.ca_fingerprint, "clinic-b", folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    assert [n.name for n in coordinator.store.nodes()] == ["clinic-a"]  # token left unused
    assert identity.app_signer()[0].startswith("fpk_")
    assert oct(folder.stat().st_mode & 0o777) == "0o700"


@pytest.mark.parametrize("bad", ["../../escape", "/etc/passwd", "ab" * 32 + "\n", "AB" * 32, ""])
def test_digests_are_checked_before_they_become_cache_paths(tmp_path: Path, bad: str) -> None:
    good = "ab" * 32
    for artifact, bundle in ((bad, good), (good, bad)):
        with pytest.raises(IntegrityError, match="not a sha256 digest"):
            fetch_bundle(None, artifact, bundle, tmp_path / "cache", b"\0" * 32)
    assert sorted(p.name for p in tmp_path.rglob("*")) in ([], ["cache"])


def test_a_corrupt_bundle_archive_is_a_one_line_integrity_error(tmp_path: Path) -> None:
    from offsite.archive import unpack_bundle

    for name, data in (("random.tar", os.urandom(5000)), ("empty.tar", b""), ("cut.tar", None)):
        archive = tmp_path / name
        if data is None:
            import io
            import tarfile

            with tarfile.open(archive, "w") as tar:
                info = tarfile.TarInfo("adapter.safetensors")
                info.size = 10_000
                tar.addfile(info, io.BytesIO(os.urandom(10_000)))
            archive.write_bytes(archive.read_bytes()[:3000])  # truncated mid-member
        else:
            archive.write_bytes(data)
        with pytest.raises(IntegrityError) as err:
            unpack_bundle(archive, tmp_path / f"out-{name}")
        assert "\n" not in str(err.value), str(err.value)


def test_audit_lines_from_two_writers_never_interleave(tmp_path: Path) -> None:
    import threading

    audit = Audit(tmp_path)

    def write(who: str) -> None:
        for i in range(300):
            audit.record("revoked", node=who, index=i, reason="x" * 200)

    threads = [threading.Thread(target=write, args=(w,)) for w in ("a", "b", "c")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = audit.path.read_text().splitlines()
    assert len(lines) == 900 and all(json.loads(line)["event"] == "revoked" for line in lines)


def test_a_flower_key_another_node_holds_is_refused(
    coordinator: Coordinator, issued: list[str]
) -> None:
    shared = _flower_key()
    first = {"node_name": "site-a", "csr_pem": _csr("site-a"), "flower_public_key": shared}
    assert _enroll(coordinator, token=coordinator.store.mint_token(), **first) is None
    token = coordinator.store.mint_token()
    # the same key, spelled differently (a comment appended): still the same key
    copy = shared.strip() + b" copied-from-site-a"
    second = {"node_name": "dup", "csr_pem": _csr("dup"), "flower_public_key": copy}
    error = _enroll(coordinator, token=token, **second)
    assert error is not None and "belongs to another node" in error.details()
    assert issued == ["site-a"] and [n.name for n in coordinator.store.nodes()] == ["site-a"]
    # a renewal cannot take another node's key either
    from coordinator.store.repository import StoreError

    coordinator.store.enroll(coordinator.store.mint_token(), "x", "ff" * 32, "")
    site_a = {k.name: k for k in coordinator.store.flower_keys()}["site-a"].public_key
    with pytest.raises(StoreError, match="belongs to another node"):
        coordinator.store.set_flower_key("x", site_a)


def test_enrollment_attempts_from_one_address_are_rate_limited(
    coordinator: Coordinator,
) -> None:
    from coordinator.service.handlers import ENROLL_ATTEMPTS

    limit = ENROLL_ATTEMPTS[0]
    guess = {"node_name": "x", "csr_pem": _csr("x"), "flower_public_key": b""}
    codes = [_enroll(coordinator, token=f"guess-{i}", **guess).code() for i in range(limit + 5)]
    assert codes[:limit] == [grpc.StatusCode.INVALID_ARGUMENT] * limit
    assert codes[limit:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 5
    assert len(Audit(coordinator.state).entries()) == limit  # the flood does not fill the log


def _signed_headers(key: ec.EllipticCurvePrivateKey, age: float = 0.0) -> dict[str, str]:
    """Flower's SuperNode authentication headers, made with Flower's own signing function."""
    import base64
    import datetime as dt

    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

    when = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=age)).isoformat()
    return {
        "flwr-public-key": base64.b64encode(public_key_to_bytes(key.public_key())).decode(),
        "flwr-signature": base64.b64encode(sign_message(key, when.encode())).decode(),
        "flwr-timestamp": when,
    }


def test_the_fleet_gate_admits_only_fresh_calls_signed_by_admitted_keys() -> None:
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    from coordinator.service.fleet_gate import FleetGate

    gate = FleetGate()
    admitted, stranger = (ec.generate_private_key(ec.SECP384R1()) for _ in range(2))
    gate.admit([public_key_to_bytes(admitted.public_key())])
    assert gate.allows(_signed_headers(admitted))
    assert not gate.allows(_signed_headers(stranger))  # a valid signature, an unknown key
    assert not gate.allows(_signed_headers(admitted, age=400))  # stale: a replay
    assert not gate.allows(_signed_headers(admitted, age=-60))  # from the future
    forged = _signed_headers(admitted)
    forged["flwr-signature"] = _signed_headers(stranger)["flwr-signature"]
    assert not gate.allows(forged)
    assert not gate.allows({}) and not gate.allows({"flwr-public-key": "!!"})
    gate.admit([])  # the node was revoked
    assert not gate.allows(_signed_headers(admitted))
