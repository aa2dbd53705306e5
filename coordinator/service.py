"""The coordinator's gRPC plane: enrollment (TLS) and artifacts (mutual TLS), thin servicers.

One server, two ports. The enrollment port offers TLS without asking for a client certificate
(gRPC cannot make that per-service), so a new node can enroll with just its token. The artifact
port demands a client certificate signed by the coordinator CA (any other fails the handshake),
and every ArtifactService call also checks that the certificate's fingerprint belongs to an
enrolled, unrevoked node — read from the registry on each call, so revocation needs no restart.
Plaintext (``insecure``) only on loopback.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from coordinator.artifact_files import CHUNK, ArtifactFiles, is_digest
from coordinator.pki import Pki, PkiError, issue_certificate, signing_public_key
from coordinator.store import Store
from coordinator.store.repository import StoreError
from offsite.certs import fingerprint
from offsite.wire.v1 import (
    artifacts_pb2,
    artifacts_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
)

log = logging.getLogger(__name__)
MAX_MESSAGE = CHUNK + 64 * 1024


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    context.abort(code, message)


def peer_fingerprint(context: grpc.ServicerContext) -> str | None:
    certs = context.auth_context().get("x509_pem_cert")
    return fingerprint(certs[0]) if certs else None


def _require_node(store: Store, context: grpc.ServicerContext) -> None:
    found = peer_fingerprint(context)
    if found is None:
        _abort(context, grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
    elif not store.is_allowed(found):
        _abort(
            context, grpc.StatusCode.PERMISSION_DENIED, "this node is not enrolled or was revoked"
        )


class ArtifactServicer(artifacts_pb2_grpc.ArtifactServiceServicer):
    def __init__(self, store: Store, files: ArtifactFiles, require_node: bool = True) -> None:
        self.store, self.files, self.require_node = store, files, require_node

    def _known(self, digest: str, context: grpc.ServicerContext) -> dict:
        if not is_digest(digest):
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "digest must be 64 lowercase hex")
        found = self.store.artifact(digest)
        if found is None or not self.files.path(digest).is_file():
            _abort(context, grpc.StatusCode.NOT_FOUND, f"no artifact {digest}")
        return found  # type: ignore[return-value]

    def Stat(self, request, context):  # type: ignore[no-untyped-def]
        if self.require_node:
            _require_node(self.store, context)
        found = self._known(request.digest, context)
        return artifacts_pb2.StatResponse(
            digest=found["digest"], kind=found["kind"], size=found["size"], chunk_size=CHUNK
        )

    def Download(self, request, context) -> Iterator[artifacts_pb2.Chunk]:  # type: ignore[no-untyped-def]
        if self.require_node:
            _require_node(self.store, context)
        found = self._known(request.digest, context)
        if request.offset > found["size"]:
            _abort(context, grpc.StatusCode.OUT_OF_RANGE, f"offset beyond {found['size']} bytes")
        with self.files.path(request.digest).open("rb") as handle:
            handle.seek(request.offset)
            offset = request.offset
            while data := handle.read(CHUNK):
                yield artifacts_pb2.Chunk(offset=offset, data=data)
                offset += len(data)

    def Upload(self, request_iterator, context):  # type: ignore[no-untyped-def]
        if self.require_node:
            _require_node(self.store, context)
        receiver = None
        try:
            for chunk in request_iterator:
                if receiver is None:
                    if not is_digest(chunk.digest) or not chunk.kind or chunk.size <= 0:
                        _abort(
                            context,
                            grpc.StatusCode.INVALID_ARGUMENT,
                            "first chunk needs digest, kind and size",
                        )
                    if self.store.artifact(chunk.digest) is not None:
                        return artifacts_pb2.UploadResponse(
                            digest=chunk.digest, already_present=True
                        )
                    receiver = self.files.receiver(chunk.digest, chunk.size)
                    kind = chunk.kind
                receiver.write(chunk.offset, chunk.data)
            if receiver is None:
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "empty upload")
            receiver.commit()  # type: ignore[union-attr]
            path = self.files.path(receiver.digest)  # type: ignore[union-attr]
            self.store.put_artifact(receiver.digest, kind, receiver.size, path)  # type: ignore[union-attr]
            return artifacts_pb2.UploadResponse(digest=receiver.digest, already_present=False)  # type: ignore[union-attr]
        except ValueError as err:
            if receiver is not None:
                receiver.abort()
            _abort(context, grpc.StatusCode.DATA_LOSS, str(err))
        except BaseException:
            if receiver is not None:
                receiver.abort()
            raise


class EnrollmentServicer(enrollment_pb2_grpc.EnrollmentServiceServicer):
    def __init__(self, store: Store, pki: Pki) -> None:
        self.store, self.pki = store, pki
        self.artifact_port = 0
        self.superlink_port = 0
        # called after a node enrolled (registers its Flower key before the node is answered)
        self.on_enrolled: Callable[[], object] | None = None

    def Enroll(self, request, context):  # type: ignore[no-untyped-def]
        try:
            certificate = issue_certificate(self.pki, request.csr_pem, request.node_name)
            self.store.enroll(
                request.token,
                request.node_name,
                fingerprint(certificate),
                request.flower_public_key.decode("utf-8", "replace"),
            )
        except PkiError as err:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except StoreError as err:
            _abort(context, grpc.StatusCode.PERMISSION_DENIED, str(err))
        log.info("enrolled node %s", request.node_name)
        if self.on_enrolled is not None:
            self.on_enrolled()
        return enrollment_pb2.EnrollResponse(
            certificate_pem=certificate,
            ca_certificate_pem=self.pki.ca_cert.read_bytes(),
            signing_public_key=signing_public_key(self.pki),
            artifact_port=self.artifact_port,
            superlink_port=self.superlink_port,
        )


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class CoordinatorServer:
    """The gRPC server (not started), its bound ports and the enrollment servicer."""

    server: grpc.Server
    enroll_port: int
    artifact_port: int
    enrollment: EnrollmentServicer


def build_server(
    store: Store,
    pki: Pki,
    files: ArtifactFiles,
    enroll_address: str,
    artifact_address: str,
    *,
    insecure: bool = False,
    workers: int = 8,
) -> CoordinatorServer:
    """A server bound to both addresses (not started)."""
    for address in (enroll_address, artifact_address):
        if insecure and not is_loopback(address):
            raise PkiError(
                f"refusing plaintext on {address}: --insecure is allowed only on a loopback address"
            )
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options)
    artifacts_pb2_grpc.add_ArtifactServiceServicer_to_server(
        ArtifactServicer(store, files, require_node=not insecure), server
    )
    enrollment = EnrollmentServicer(store, pki)
    enrollment_pb2_grpc.add_EnrollmentServiceServicer_to_server(enrollment, server)
    if insecure:
        ports = [
            server.add_insecure_port(enroll_address),
            server.add_insecure_port(artifact_address),
        ]
    else:
        identity = [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())]
        tls = grpc.ssl_server_credentials(identity)
        mutual = grpc.ssl_server_credentials(
            identity, root_certificates=pki.ca_cert.read_bytes(), require_client_auth=True
        )
        ports = [
            server.add_secure_port(enroll_address, tls),
            server.add_secure_port(artifact_address, mutual),
        ]
    if 0 in ports:
        raise OSError(f"could not bind {enroll_address} and {artifact_address}")
    enrollment.artifact_port = ports[1]
    return CoordinatorServer(server, ports[0], ports[1], enrollment)


def state_paths(state_dir: Path) -> tuple[Pki, ArtifactFiles]:
    return Pki(Path(state_dir) / "pki"), ArtifactFiles(Path(state_dir) / "artifacts")
