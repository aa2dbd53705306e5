"""The coordinator's gRPC plane on loopback: enrollment, mutual TLS, revocation, artifacts."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from client.artifacts import download, fetch_bundle
from client.identity import JoinError, NodeIdentity, join
from coordinator.service.artifact_files import CHUNK
from coordinator.service.grpc_server import build_server, state_paths
from coordinator.service.pki import Pki, PkiError, init_pki, issue_certificate, signing_key
from coordinator.store import Store, open_store
from emulator.adapter import AdapterSpec
from emulator.arch import arch_spec
from emulator.bundle import sign_bundle, write_bundle
from emulator.digest import file_sha256
from emulator.layers import plan_layers
from offsite.crypto import fingerprint
from offsite.errors import IntegrityError
from offsite.wire.clients import ArtifactClient
from offsite.wire.domain import DownloadRequest, StatRequest
from tests.conftest import tiny_model


@dataclass
class Coordinator:
    state: Path
    store: Store
    pki: Pki
    address: str  # enrollment (TLS)
    artifacts: str  # mutual TLS
    server: grpc.Server

    @property
    def ca_fingerprint(self) -> str:
        return fingerprint(self.pki.ca_cert.read_bytes())


def _start(state: Path, enroll_port: int = 0, artifact_port: int = 0) -> Coordinator:
    pki, files = state_paths(state)
    if not pki.exists():
        init_pki(pki.folder, ["localhost"])
    store = open_store(state)
    built = build_server(
        store, pki, files, f"127.0.0.1:{enroll_port}", f"127.0.0.1:{artifact_port}"
    )
    built.server.start()
    return Coordinator(
        state,
        store,
        pki,
        f"127.0.0.1:{built.enroll_port}",
        f"127.0.0.1:{built.artifact_port}",
        built.server,
    )


@pytest.fixture()
def coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    running = _start(tmp_path / "coordinator")
    yield running
    running.server.stop(None)


def _join(coordinator: Coordinator, folder: Path, name: str = "clinic-a") -> NodeIdentity:
    token = coordinator.store.mint_token()
    return join(coordinator.address, token, coordinator.ca_fingerprint, name, folder)


def _stub(coordinator: Coordinator, identity: NodeIdentity) -> ArtifactClient:
    return ArtifactClient(identity.channel())


def _add_blob(coordinator: Coordinator, size: int) -> str:
    _, files = state_paths(coordinator.state)
    data = os.urandom(size)
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    files.path(digest).write_bytes(data)
    coordinator.store.put_artifact(digest, "adapter", size, files.path(digest))
    return digest


def test_join_then_fetch_a_signed_bundle(
    coordinator: Coordinator, tmp_path: Path, tokenizer
) -> None:
    identity = _join(coordinator, tmp_path / "node")
    assert identity.exists() and oct(identity.key.stat().st_mode & 0o777) == "0o600"
    assert oct(coordinator.pki.ca_key.stat().st_mode & 0o777) == "0o600"
    full = tiny_model("llama")
    plan = plan_layers(6, 1, 1, 2)
    spec = AdapterSpec.for_plan("lora", plan, arch_spec(full.config), 4, 8)
    bundle = write_bundle(full, tokenizer, plan, spec, tmp_path / "bundle", source="tiny")
    sign_bundle(bundle.path, signing_key(coordinator.pki))
    _, files = state_paths(coordinator.state)
    artifact, size = files.add_bundle(bundle.path)
    coordinator.store.put_artifact(artifact, "bundle", size, files.path(artifact))

    channel = identity.channel()
    fetched = fetch_bundle(
        channel, artifact, bundle.digest, tmp_path / "cache", identity.signing_key()
    )
    assert fetched.digest == bundle.digest
    # a bundle signed by someone else is refused before anything is loaded: the same files
    # (so the same digest; a second write_bundle would differ by its manifest's creation
    # second), re-signed with another key
    other = tmp_path / "forged"
    shutil.copytree(bundle.path, other)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    sign_bundle(other, Ed25519PrivateKey.generate())
    forged, size = files.add_bundle(other)
    coordinator.store.put_artifact(forged, "bundle", size, files.path(forged))
    with pytest.raises(IntegrityError, match="signature does not verify"):
        fetch_bundle(channel, forged, bundle.digest, tmp_path / "cache2", identity.signing_key())


def test_reused_expired_and_unknown_tokens_are_refused(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    token = coordinator.store.mint_token()
    join(coordinator.address, token, coordinator.ca_fingerprint, "clinic-a", tmp_path / "a")
    with pytest.raises(JoinError, match="already used"):
        join(coordinator.address, token, coordinator.ca_fingerprint, "clinic-b", tmp_path / "b")
    expired = coordinator.store.mint_token(ttl=timedelta(seconds=-5))
    with pytest.raises(JoinError, match="expired"):
        join(coordinator.address, expired, coordinator.ca_fingerprint, "clinic-c", tmp_path / "c")
    with pytest.raises(JoinError, match="unknown"):
        join(coordinator.address, "made-up", coordinator.ca_fingerprint, "clinic-d", tmp_path / "d")
    with pytest.raises(JoinError, match="does not present a CA"):
        join(
            coordinator.address,
            coordinator.store.mint_token(),
            "00" * 32,
            "clinic-e",
            tmp_path / "e",
        )


def test_plaintext_anonymous_and_foreign_ca_clients_are_refused(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    digest = _add_blob(coordinator, 1000)
    request = StatRequest(digest)
    plain = ArtifactClient(grpc.insecure_channel(coordinator.artifacts))
    with pytest.raises(grpc.RpcError) as err:
        plain.stat(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    anonymous = grpc.ssl_channel_credentials(root_certificates=coordinator.pki.ca_cert.read_bytes())
    for address in (coordinator.address, coordinator.artifacts):
        stub = ArtifactClient(grpc.secure_channel(address, anonymous))
        with pytest.raises(grpc.RpcError) as err:
            stub.stat(request, timeout=5)
        # the enrollment port answers "who are you"; the mutual-TLS port refuses the handshake
        assert err.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE)
    # a certificate from another CA fails the handshake
    foreign = init_pki(tmp_path / "foreign", ["localhost"])
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intruder")]))
        .sign(key, hashes.SHA256())
    )
    cert = issue_certificate(foreign, csr.public_bytes(serialization.Encoding.PEM), "intruder")
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    credentials = grpc.ssl_channel_credentials(coordinator.pki.ca_cert.read_bytes(), pem, cert)
    stub = ArtifactClient(grpc.secure_channel(coordinator.artifacts, credentials))
    with pytest.raises(grpc.RpcError) as err:
        stub.stat(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_revocation_is_immediate_and_survives_a_restart(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    identity = _join(coordinator, tmp_path / "node")
    digest = _add_blob(coordinator, 1000)
    stub = _stub(coordinator, identity)
    assert stub.stat(StatRequest(digest), timeout=5).size == 1000
    assert coordinator.store.revoke("clinic-a")
    with pytest.raises(grpc.RpcError) as err:
        stub.stat(StatRequest(digest), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    coordinator.server.stop(None)
    coordinator.store.engine.dispose()
    ports = [int(a.rpartition(":")[2]) for a in (coordinator.address, coordinator.artifacts)]
    restarted = _start(coordinator.state, *ports)
    try:
        with pytest.raises(grpc.RpcError) as err:
            _stub(restarted, identity).stat(StatRequest(digest), timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        restarted.server.stop(None)


def test_a_download_cut_halfway_resumes_without_resending(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    identity = _join(coordinator, tmp_path / "node")
    size = 2 * CHUNK + 12345
    digest = _add_blob(coordinator, size)
    stub = _stub(coordinator, identity)
    folder = tmp_path / "cache"
    folder.mkdir()
    stream = stub.download(DownloadRequest(digest, offset=0), timeout=30)
    first = next(stream)
    stream.close()  # the connection dies after one chunk (~half the file): the call is cancelled
    (folder / f"{digest}.partial").write_bytes(first.data)
    offsets: list[int] = []

    class Recording:  # the real client, remembering where the resumed download starts
        stat = stub.stat

        def download(self, request, **kwargs):
            offsets.append(request.offset)
            return stub.download(request, **kwargs)

    path = download(Recording(), digest, folder)
    assert file_sha256(path) == digest
    resent = len(first.data) - offsets[0]  # bytes the server had to send twice
    assert offsets == [len(first.data)] and 0 <= resent <= CHUNK


def test_the_artifact_plane_is_download_only(coordinator: Coordinator, tmp_path: Path) -> None:
    """Nodes have nothing to store on the coordinator: an upload call is not even routed."""
    identity = _join(coordinator, tmp_path / "node")
    upload = identity.channel().stream_unary(
        "/offsite.v1.ArtifactService/Upload",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    before = sorted(p.name for p in (coordinator.state / "artifacts").iterdir())
    with pytest.raises(grpc.RpcError) as err:
        upload(iter([os.urandom(1 << 20)] * 3), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert sorted(p.name for p in (coordinator.state / "artifacts").iterdir()) == before


def test_a_second_server_on_a_bound_port_fails_with_address_in_use(
    coordinator: Coordinator,
) -> None:
    from coordinator.service.grpc_server import AddressInUse

    pki, files = state_paths(coordinator.state)
    with pytest.raises(AddressInUse, match="address in use"):
        build_server(coordinator.store, pki, files, coordinator.address, "127.0.0.1:0")
    with pytest.raises(AddressInUse, match="address in use"):
        build_server(coordinator.store, pki, files, "127.0.0.1:0", coordinator.artifacts)


@pytest.mark.integration
def test_fuzzed_requests_do_not_crash_the_server(coordinator: Coordinator, tmp_path: Path) -> None:
    identity = _join(coordinator, tmp_path / "node")
    digest = _add_blob(coordinator, 100)
    channel = identity.channel()
    rng = random.Random(0)
    methods = {
        "/offsite.v1.ArtifactService/Stat": channel.unary_unary,
        "/offsite.v1.EnrollmentService/Enroll": channel.unary_unary,
        "/offsite.v1.ArtifactService/Download": channel.unary_stream,
        "/offsite.v1.NodeService/RenewFlowerKey": channel.unary_unary,
    }
    codes: set[grpc.StatusCode] = set()
    for path, factory in methods.items():
        call = factory(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        for _ in range(10_000):
            payload = rng.randbytes(rng.randrange(0, 64))
            try:
                if factory is channel.unary_stream:
                    list(call(payload, timeout=5))
                elif factory is channel.stream_unary:
                    call(iter([payload]), timeout=5)
                else:
                    call(payload, timeout=5)
            except grpc.RpcError as err:
                codes.add(err.code())
    assert grpc.StatusCode.UNAVAILABLE not in codes  # the server never went away
    assert ArtifactClient(channel).stat(StatRequest(digest), timeout=5).size == 100


def test_plaintext_is_refused_off_loopback(tmp_path: Path) -> None:
    pki, files = state_paths(tmp_path)
    init_pki(pki.folder, ["localhost"])
    with pytest.raises(PkiError, match="loopback"):
        build_server(open_store(tmp_path), pki, files, "0.0.0.0:0", "127.0.0.1:0", insecure=True)
    with pytest.raises(PkiError, match="refusing to replace"):
        init_pki(pki.folder, ["localhost"])


@pytest.mark.parametrize("entry", ["../escape", "/etc/passwd", "sub/file", "link"])
def test_bundle_archives_with_unsafe_entries_are_refused(tmp_path: Path, entry: str) -> None:
    import io
    import tarfile

    from offsite.archive import unpack_bundle

    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo(entry)
        if entry == "link":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(IntegrityError, match="unsafe entry"):
        unpack_bundle(archive, tmp_path / "out")
    assert not (tmp_path / "escape").exists()
    assert not any((tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else True
