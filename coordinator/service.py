"""The coordinator's gRPC plane: enrollment (TLS), artifacts and node services (mutual TLS).

One server, two ports. The enrollment port offers TLS without asking for a client certificate
(gRPC cannot make that per-service), so a new node can enroll with just its token. The artifact
port demands a client certificate signed by the coordinator CA (any other fails the handshake),
and every ArtifactService and NodeService call also checks that the certificate's fingerprint
belongs to an enrolled, unrevoked node — read from the registry on each call, so revocation
needs no restart. The artifact plane is download-only: nodes have nothing to store here.
Plaintext (``insecure``) only on loopback. Ports are bound exclusively (no ``SO_REUSEPORT``,
which gRPC sets by default): a second coordinator on the same port fails instead of sharing it.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from coordinator.artifact_files import CHUNK, ArtifactFiles
from coordinator.audit import Audit
from coordinator.pki import (
    Pki,
    PkiError,
    app_signer,
    check_csr,
    issue_certificate,
    signing_public_key,
)
from coordinator.store import Store
from coordinator.store.repository import StoreError
from offsite.certs import canonical_flower_key, fingerprint
from offsite.digests import is_sha256
from offsite.errors import ExitCode, OffsiteError
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


def _require_node(store: Store, context: grpc.ServicerContext) -> str:
    """The calling node's name, or the call is aborted (no certificate, unknown, revoked)."""
    found = peer_fingerprint(context)
    if found is None:
        _abort(context, grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
    node = store.node(fingerprint=found)
    if node is None or node.status != "active":
        _abort(
            context, grpc.StatusCode.PERMISSION_DENIED, "this node is not enrolled or was revoked"
        )
    return node.name  # type: ignore[union-attr]


class ArtifactServicer(artifacts_pb2_grpc.ArtifactServiceServicer):
    def __init__(self, store: Store, files: ArtifactFiles, require_node: bool = True) -> None:
        self.store, self.files, self.require_node = store, files, require_node

    def _known(self, digest: str, context: grpc.ServicerContext) -> dict:
        if not is_sha256(digest):
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


class RateLimit:
    """At most ``count`` calls per ``seconds`` for each key (a sliding window in memory)."""

    def __init__(self, count: int, seconds: float) -> None:
        self.count, self.seconds = count, seconds
        self._calls: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            calls = self._calls.setdefault(key, deque())
            while calls and calls[0] <= now - self.seconds:
                calls.popleft()
            if len(calls) >= self.count:
                return False
            calls.append(now)
            if len(self._calls) > 10_000:  # forget idle callers
                self._calls = {k: v for k, v in self._calls.items() if v}
            return True


def peer_host(context: grpc.ServicerContext) -> str:
    """The caller's address without its port ("ipv4:10.0.0.5:51234" -> "10.0.0.5")."""
    peer = context.peer() or "unknown"
    return peer.split(":", 1)[-1].rsplit(":", 1)[0].strip("[]")


ENROLL_ATTEMPTS = (30, 60.0)  # per caller address and minute: enough for any real onboarding
RENEWALS = (6, 60.0)  # per node and minute: a SuperNode restarts far less often


class EnrollmentServicer(enrollment_pb2_grpc.EnrollmentServiceServicer):
    def __init__(self, store: Store, pki: Pki, audit: Audit | None = None) -> None:
        self.store, self.pki, self.audit = store, pki, audit
        self.attempts = RateLimit(*ENROLL_ATTEMPTS)
        self.artifact_port = 0
        self.superlink_port = 0
        # called after a node enrolled (registers its Flower key before the node is answered)
        self.on_enrolled: Callable[[], object] | None = None

    def _record(self, event: str, **fields: object) -> None:
        if self.audit is not None:
            self.audit.record(event, **fields)

    def _refused(self, name: str, peer: str, err: Exception) -> None:
        """Audit a refusal: the name is only what the caller claimed (printable, shortened)."""
        claimed = "".join(c if c.isprintable() else "?" for c in name[:63])
        self._record("enrollment-refused", claimed_node=claimed, peer=peer, reason=str(err)[:200])

    def Enroll(self, request, context):  # type: ignore[no-untyped-def]
        name, peer = request.node_name, peer_host(context)
        if not self.attempts.allow(peer):
            _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "too many enrollment attempts from this address; wait a minute",
            )
        try:
            # everything the node sent is checked before the token is touched; the certificate
            # is signed only inside the token's transaction, once the token proved good
            check_csr(request.csr_pem, name)
            flower_key = canonical_flower_key(request.flower_public_key)
            issued: list[bytes] = []

            def issue() -> str:
                issued.append(issue_certificate(self.pki, request.csr_pem, name))
                return fingerprint(issued[0])

            node = self.store.enroll(request.token, name, issue, flower_key)
        except (PkiError, ValueError, UnicodeDecodeError) as err:
            self._refused(name, peer, err)
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except StoreError as err:
            self._refused(name, peer, err)
            _abort(context, grpc.StatusCode.PERMISSION_DENIED, str(err))
        self._record("enrolled", node=name, fingerprint=node.fingerprint)
        if self.on_enrolled is not None:
            self.on_enrolled()
        signer = app_signer(self.pki)
        return enrollment_pb2.EnrollResponse(
            certificate_pem=issued[0],
            ca_certificate_pem=self.pki.ca_cert.read_bytes(),
            signing_public_key=signing_public_key(self.pki),
            artifact_port=self.artifact_port,
            superlink_port=self.superlink_port,
            app_signing_public_key=signer.public_key,
            app_signing_key_id=signer.key_id,
        )


class NodeServicer(enrollment_pb2_grpc.NodeServiceServicer):
    """Calls of enrolled nodes about their own registration (mutual TLS only)."""

    def __init__(self, store: Store, audit: Audit | None = None) -> None:
        self.store, self.audit = store, audit
        self.renewals = RateLimit(*RENEWALS)
        # decides a renewal: (node name, new key) -> renewed?; None: no SuperLink here
        self.renew: Callable[[str, str], bool] | None = None

    def RenewFlowerKey(self, request, context):  # type: ignore[no-untyped-def]
        name = _require_node(self.store, context)
        if self.renew is None:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION, "no SuperLink runs here")
        if not self.renewals.allow(name):
            _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "too many key renewals from this node; wait a minute",
            )
        try:
            key = canonical_flower_key(request.flower_public_key)
            renewed = self.renew(name, key)  # type: ignore[misc]
        except (ValueError, UnicodeDecodeError) as err:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except StoreError as err:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except OffsiteError as err:
            _abort(context, grpc.StatusCode.UNAVAILABLE, str(err))
        return enrollment_pb2.RenewFlowerKeyResponse(renewed=renewed)


class AddressInUse(OffsiteError):
    """A port the coordinator needs is taken."""

    exit_code = ExitCode.ADDRESS_IN_USE


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
    nodes: NodeServicer


def build_server(
    store: Store,
    pki: Pki,
    files: ArtifactFiles,
    enroll_address: str,
    artifact_address: str,
    *,
    insecure: bool = False,
    workers: int = 8,
    audit: Audit | None = None,
) -> CoordinatorServer:
    """A server bound to both addresses (not started); its audit trail defaults to the state
    folder's (``pki``'s parent)."""
    audit = audit or Audit(pki.folder.parent)
    for address in (enroll_address, artifact_address):
        if insecure and not is_loopback(address):
            raise PkiError(
                f"refusing plaintext on {address}: --insecure is allowed only on a loopback address"
            )
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options)
    artifacts_pb2_grpc.add_ArtifactServiceServicer_to_server(
        ArtifactServicer(store, files, require_node=not insecure), server
    )
    enrollment = EnrollmentServicer(store, pki, audit)
    enrollment_pb2_grpc.add_EnrollmentServiceServicer_to_server(enrollment, server)
    nodes = NodeServicer(store, audit)
    enrollment_pb2_grpc.add_NodeServiceServicer_to_server(nodes, server)
    if insecure:
        credentials: tuple[grpc.ServerCredentials | None, ...] = (None, None)
    else:
        identity = [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())]
        tls = grpc.ssl_server_credentials(identity)
        mutual = grpc.ssl_server_credentials(
            identity, root_certificates=pki.ca_cert.read_bytes(), require_client_auth=True
        )
        credentials = (tls, mutual)
    ports = []
    for address, credential in zip((enroll_address, artifact_address), credentials, strict=True):
        try:
            port = (
                server.add_insecure_port(address)
                if credential is None
                else server.add_secure_port(address, credential)
            )
        except RuntimeError:  # grpc >= 1.60 raises where it used to return 0
            port = 0
        if port == 0:
            server.stop(None)
            raise AddressInUse(f"cannot listen on {address}: address in use")
        ports.append(port)
    enrollment.artifact_port = ports[1]
    return CoordinatorServer(server, ports[0], ports[1], enrollment, nodes)


def state_paths(state_dir: Path) -> tuple[Pki, ArtifactFiles]:
    return Pki(Path(state_dir) / "pki"), ArtifactFiles(Path(state_dir) / "artifacts")
