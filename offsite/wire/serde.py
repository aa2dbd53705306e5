"""The one module that converts protobuf messages <-> the plain values of ``offsite.wire.domain``.

Each message has a pair of small functions (typed through the generated ``.pyi`` stubs) and one
row in ``CODECS``; ``to_proto`` and ``from_proto`` look the row up. Every field is copied by
name, nothing is defaulted here: proto3 already reads an absent field as empty, and the handlers
validate what they receive. ``tests/offsite/test_wire_serde.py`` round-trips every message of the
generated modules through this table, so a new message without a codec fails there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

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
from offsite.wire.v1 import artifacts_pb2 as _artifacts
from offsite.wire.v1 import enrollment_pb2 as _enrollment

# the generated modules this table covers (the round-trip test walks their descriptors)
PROTO_MODULES = (_artifacts, _enrollment)

WireValue = (
    StatRequest
    | ArtifactStat
    | DownloadRequest
    | Chunk
    | EnrollRequest
    | EnrollGrant
    | RenewFlowerKeyRequest
    | RenewFlowerKeyReply
)
_T = TypeVar("_T")


# ---------------------------------------------------------------- ArtifactService


def _stat_request(value: StatRequest) -> _artifacts.StatRequest:
    return _artifacts.StatRequest(digest=value.digest)


def _stat_request_back(message: _artifacts.StatRequest) -> StatRequest:
    return StatRequest(digest=message.digest)


def _artifact_stat(value: ArtifactStat) -> _artifacts.StatResponse:
    return _artifacts.StatResponse(
        digest=value.digest, kind=value.kind, size=value.size, chunk_size=value.chunk_size
    )


def _artifact_stat_back(message: _artifacts.StatResponse) -> ArtifactStat:
    return ArtifactStat(
        digest=message.digest, kind=message.kind, size=message.size, chunk_size=message.chunk_size
    )


def _download_request(value: DownloadRequest) -> _artifacts.DownloadRequest:
    return _artifacts.DownloadRequest(digest=value.digest, offset=value.offset)


def _download_request_back(message: _artifacts.DownloadRequest) -> DownloadRequest:
    return DownloadRequest(digest=message.digest, offset=message.offset)


def _chunk(value: Chunk) -> _artifacts.Chunk:
    return _artifacts.Chunk(offset=value.offset, data=value.data)


def _chunk_back(message: _artifacts.Chunk) -> Chunk:
    return Chunk(offset=message.offset, data=message.data)


# ---------------------------------------------------------------- EnrollmentService, NodeService


def _enroll_request(value: EnrollRequest) -> _enrollment.EnrollRequest:
    return _enrollment.EnrollRequest(
        token=value.token,
        node_name=value.node_name,
        csr_pem=value.csr_pem,
        flower_public_key=value.flower_public_key,
    )


def _enroll_request_back(message: _enrollment.EnrollRequest) -> EnrollRequest:
    return EnrollRequest(
        token=message.token,
        node_name=message.node_name,
        csr_pem=message.csr_pem,
        flower_public_key=message.flower_public_key,
    )


def _enroll_grant(value: EnrollGrant) -> _enrollment.EnrollResponse:
    return _enrollment.EnrollResponse(
        certificate_pem=value.certificate_pem,
        ca_certificate_pem=value.ca_certificate_pem,
        signing_public_key=value.signing_public_key,
        artifact_port=value.artifact_port,
        superlink_port=value.superlink_port,
        app_signing_public_key=value.app_signing_public_key,
        app_signing_key_id=value.app_signing_key_id,
    )


def _enroll_grant_back(message: _enrollment.EnrollResponse) -> EnrollGrant:
    return EnrollGrant(
        certificate_pem=message.certificate_pem,
        ca_certificate_pem=message.ca_certificate_pem,
        signing_public_key=message.signing_public_key,
        artifact_port=message.artifact_port,
        superlink_port=message.superlink_port,
        app_signing_public_key=message.app_signing_public_key,
        app_signing_key_id=message.app_signing_key_id,
    )


def _renew_request(value: RenewFlowerKeyRequest) -> _enrollment.RenewFlowerKeyRequest:
    return _enrollment.RenewFlowerKeyRequest(flower_public_key=value.flower_public_key)


def _renew_request_back(message: _enrollment.RenewFlowerKeyRequest) -> RenewFlowerKeyRequest:
    return RenewFlowerKeyRequest(flower_public_key=message.flower_public_key)


def _renew_reply(value: RenewFlowerKeyReply) -> _enrollment.RenewFlowerKeyResponse:
    return _enrollment.RenewFlowerKeyResponse(renewed=value.renewed)


def _renew_reply_back(message: _enrollment.RenewFlowerKeyResponse) -> RenewFlowerKeyReply:
    return RenewFlowerKeyReply(renewed=message.renewed)


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Codec(Generic[_T]):
    """One protobuf message class and its domain twin, with both conversions."""

    proto: type[Any]  # the generated message class
    domain: type[_T]
    encode: Callable[[_T], Any]
    decode: Callable[[Any], _T]


CODECS: tuple[Codec[Any], ...] = (
    Codec(_artifacts.StatRequest, StatRequest, _stat_request, _stat_request_back),
    Codec(_artifacts.StatResponse, ArtifactStat, _artifact_stat, _artifact_stat_back),
    Codec(_artifacts.DownloadRequest, DownloadRequest, _download_request, _download_request_back),
    Codec(_artifacts.Chunk, Chunk, _chunk, _chunk_back),
    Codec(_enrollment.EnrollRequest, EnrollRequest, _enroll_request, _enroll_request_back),
    Codec(_enrollment.EnrollResponse, EnrollGrant, _enroll_grant, _enroll_grant_back),
    Codec(
        _enrollment.RenewFlowerKeyRequest,
        RenewFlowerKeyRequest,
        _renew_request,
        _renew_request_back,
    ),
    Codec(_enrollment.RenewFlowerKeyResponse, RenewFlowerKeyReply, _renew_reply, _renew_reply_back),
)
_BY_DOMAIN: dict[type[Any], Codec[Any]] = {codec.domain: codec for codec in CODECS}


def to_proto(value: WireValue) -> Any:
    """The protobuf message of ``value`` (typed ``Any``: protobuf ships no type stubs here)."""
    return _BY_DOMAIN[type(value)].encode(value)


def from_proto(message: Any, kind: type[_T]) -> _T:
    """``message`` as a ``kind``; TypeError when ``message`` is not the protobuf twin of
    ``kind`` (a caller or stub wired to the wrong method)."""
    codec = _BY_DOMAIN.get(kind)
    if codec is None or not isinstance(message, codec.proto):
        raise TypeError(f"{type(message).__name__} is not the protobuf form of {kind.__name__}")
    value = codec.decode(message)
    if not isinstance(value, kind):  # cannot happen with a well-formed table; narrows the type
        raise TypeError(f"the codec of {kind.__name__} made a {type(value).__name__}")
    return value
