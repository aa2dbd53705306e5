"""Typed clients of the coordinator's gRPC services: a channel in, domain values out.

Callers build the channel (its credentials are theirs: TLS with a pinned CA for enrollment,
mutual TLS after) and get methods that take and return ``offsite.wire.domain`` values. A call
the server refuses raises ``grpc.RpcError`` as gRPC made it (``code()``, ``details()``): callers
decide what a status means to them. Only this package builds stubs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc

from offsite.wire import serde
from offsite.wire.domain import (
    ArtifactStat,
    Chunk,
    DownloadRequest,
    EnrollGrant,
    EnrollRequest,
    RenewFlowerKeyReply,
    RenewFlowerKeyRequest,
    StatRequest,
)
from offsite.wire.v1 import artifacts_pb2_grpc, enrollment_pb2_grpc

# the generated stubs are untyped: these names type them (a channel in, a stub out); every
# method below types what crosses a stub
_ArtifactStub: Callable[[grpc.Channel], Any] = artifacts_pb2_grpc.ArtifactServiceStub
_EnrollmentStub: Callable[[grpc.Channel], Any] = enrollment_pb2_grpc.EnrollmentServiceStub
_NodeStub: Callable[[grpc.Channel], Any] = enrollment_pb2_grpc.NodeServiceStub


class ArtifactClient:
    """ArtifactService (mutual TLS): stat an artifact, download it from an offset."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = _ArtifactStub(channel)

    def stat(self, request: StatRequest, *, timeout: float | None = None) -> ArtifactStat:
        reply = self._stub.Stat(serde.to_proto(request), timeout=timeout)
        return serde.from_proto(reply, ArtifactStat)

    def download(
        self, request: DownloadRequest, *, timeout: float | None = None
    ) -> Iterator[Chunk]:
        """The chunks from ``request.offset`` on; closing the iterator early cancels the call."""
        call = self._stub.Download(serde.to_proto(request), timeout=timeout)
        return _chunks(call)


def _chunks(call: Any) -> Iterator[Chunk]:
    try:
        for message in call:
            yield serde.from_proto(message, Chunk)
    finally:
        call.cancel()  # a no-op once the stream ended


class EnrollmentClient:
    """EnrollmentService (TLS, the CA pinned by the caller): a one-time token for a certificate."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = _EnrollmentStub(channel)

    def enroll(self, request: EnrollRequest, *, timeout: float | None = None) -> EnrollGrant:
        reply = self._stub.Enroll(serde.to_proto(request), timeout=timeout)
        return serde.from_proto(reply, EnrollGrant)


class NodeClient:
    """NodeService (mutual TLS): an enrolled node's calls about its own registration."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = _NodeStub(channel)

    def renew_flower_key(
        self, request: RenewFlowerKeyRequest, *, timeout: float | None = None
    ) -> RenewFlowerKeyReply:
        reply = self._stub.RenewFlowerKey(serde.to_proto(request), timeout=timeout)
        return serde.from_proto(reply, RenewFlowerKeyReply)
