"""The coordinator's gRPC plane: enrollment (TLS), artifacts and node services (mutual TLS).

One server, two ports. The enrollment port offers TLS without asking for a client certificate
(gRPC cannot make that per-service), so a new node can enroll with just its token. The artifact
port demands a client certificate signed by the coordinator CA (any other fails the handshake),
and every ArtifactService and NodeService call also checks that the certificate's fingerprint
belongs to an enrolled, unrevoked node — read from the registry on each call, so revocation
needs no restart. The artifact plane is download-only: nodes have nothing to store here.
Plaintext (``insecure``) only on loopback. Ports are bound exclusively (no ``SO_REUSEPORT``,
which gRPC sets by default): a second coordinator on the same port fails instead of sharing it.

This module only builds and binds the server. What each call decides is in
``coordinator/service/handlers.py`` (no gRPC there); the thin servicers of
``offsite.wire.servicers`` convert the messages and turn a handler's refusal into the call's status.
"""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from coordinator.service.artifact_files import CHUNK, ArtifactFiles
from coordinator.service.audit import Audit
from coordinator.service.handlers import ArtifactHandler, EnrollmentHandler, NodeHandler
from coordinator.service.pki import Pki, PkiError
from coordinator.store import Store
from offsite.errors import ExitCode, OffsiteError
from offsite.host.network import is_loopback
from offsite.wire.servicers import add_services

log = logging.getLogger(__name__)
MAX_MESSAGE = CHUNK + 64 * 1024


class AddressInUse(OffsiteError):
    """A port the coordinator needs is taken."""

    exit_code = ExitCode.ADDRESS_IN_USE


@dataclass
class CoordinatorServer:
    """The gRPC server (not started), its bound ports and the handlers that want settings
    known only later (the SuperLink's port, what to do after an enrollment or on a renewal)."""

    server: grpc.Server
    enroll_port: int
    artifact_port: int
    enrollment: EnrollmentHandler
    nodes: NodeHandler


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
    enrollment = EnrollmentHandler(store, pki, audit)
    nodes = NodeHandler(store, audit)
    add_services(
        server,
        artifacts=ArtifactHandler(store, files, require_node=not insecure),
        enrollment=enrollment,
        nodes=nodes,
    )
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
