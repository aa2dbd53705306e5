"""Thin gRPC servicers: protobuf in, a plain handler call, protobuf out, refusals as statuses.

The coordinator's logic lives in handlers that never see gRPC or protobuf (they implement the
Protocols below; ``coordinator/service/handlers.py``). A servicer here only
1. reads who is calling from the gRPC context into a ``Peer`` (address, client-certificate
   fingerprint) — handlers decide what that means;
2. converts the request with ``offsite.wire.serde`` and calls the handler;
3. converts the answer back, or aborts the call with the status of the handler's ``Refused``.
Any other exception is a bug and reaches gRPC as it is (status UNKNOWN), never re-labelled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NoReturn, Protocol

import grpc

from offsite.crypto import fingerprint
from offsite.wire import serde
from offsite.wire.domain import (
    ArtifactStat,
    Chunk,
    DownloadRequest,
    EnrollGrant,
    EnrollRequest,
    Peer,
    Refused,
    RenewFlowerKeyReply,
    RenewFlowerKeyRequest,
    StatRequest,
)
from offsite.wire.v1 import artifacts_pb2_grpc, enrollment_pb2_grpc

# the generated registration functions are untyped: these names type them
_Register = Callable[[Any, grpc.Server], None]
_add_artifacts: _Register = artifacts_pb2_grpc.add_ArtifactServiceServicer_to_server
_add_enrollment: _Register = enrollment_pb2_grpc.add_EnrollmentServiceServicer_to_server
_add_nodes: _Register = enrollment_pb2_grpc.add_NodeServiceServicer_to_server


class ArtifactHandler(Protocol):
    def stat(self, peer: Peer, request: StatRequest) -> ArtifactStat: ...

    def download(self, peer: Peer, request: DownloadRequest) -> Iterator[Chunk]:
        """Refuse (raise) before returning the iterator: a refusal met while streaming is not
        turned into a status."""
        ...


class EnrollmentHandler(Protocol):
    def enroll(self, peer: Peer, request: EnrollRequest) -> EnrollGrant: ...


class NodeHandler(Protocol):
    def renew_flower_key(
        self, peer: Peer, request: RenewFlowerKeyRequest
    ) -> RenewFlowerKeyReply: ...


def peer_of(context: grpc.ServicerContext) -> Peer:
    """The caller: address without its port ("ipv4:10.0.0.5:51234" -> "10.0.0.5") and the
    fingerprint of the client certificate it presented, if any."""
    address = context.peer() or "unknown"
    host = address.split(":", 1)[-1].rsplit(":", 1)[0].strip("[]")
    certificates = context.auth_context().get("x509_pem_cert")
    return Peer(host, fingerprint(certificates[0]) if certificates else None)


def _abort(context: grpc.ServicerContext, refused: Refused) -> NoReturn:
    context.abort(grpc.StatusCode[refused.status.name], refused.message)
    raise AssertionError("grpc's context.abort returned")  # it always raises


def _answer(context: grpc.ServicerContext, call: Callable[[], serde.WireValue]) -> Any:
    try:
        return serde.to_proto(call())
    except Refused as refused:
        _abort(context, refused)


class ArtifactServicer:
    def __init__(self, handler: ArtifactHandler) -> None:
        self.handler = handler

    def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:
        query = serde.from_proto(request, StatRequest)
        return _answer(context, lambda: self.handler.stat(peer_of(context), query))

    def Download(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        query = serde.from_proto(request, DownloadRequest)
        try:
            chunks = self.handler.download(peer_of(context), query)
        except Refused as refused:
            _abort(context, refused)
        for chunk in chunks:
            yield serde.to_proto(chunk)


class EnrollmentServicer:
    def __init__(self, handler: EnrollmentHandler) -> None:
        self.handler = handler

    def Enroll(self, request: Any, context: grpc.ServicerContext) -> Any:
        query = serde.from_proto(request, EnrollRequest)
        return _answer(context, lambda: self.handler.enroll(peer_of(context), query))


class NodeServicer:
    def __init__(self, handler: NodeHandler) -> None:
        self.handler = handler

    def RenewFlowerKey(self, request: Any, context: grpc.ServicerContext) -> Any:
        query = serde.from_proto(request, RenewFlowerKeyRequest)
        return _answer(context, lambda: self.handler.renew_flower_key(peer_of(context), query))


def add_services(
    server: grpc.Server,
    *,
    artifacts: ArtifactHandler | None = None,
    enrollment: EnrollmentHandler | None = None,
    nodes: NodeHandler | None = None,
) -> None:
    """Serve each given handler's service on ``server`` (before it starts)."""
    if artifacts is not None:
        _add_artifacts(ArtifactServicer(artifacts), server)
    if enrollment is not None:
        _add_enrollment(EnrollmentServicer(enrollment), server)
    if nodes is not None:
        _add_nodes(NodeServicer(nodes), server)
