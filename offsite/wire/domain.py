"""The artifact plane's calls as plain values: what handlers and callers see, never protobuf.

One frozen dataclass per protobuf message of ``proto/offsite/v1`` (``offsite.wire.serde``
converts between them), with the same field names, so a field added to a ``.proto`` without its
twin here fails ``tests/offsite/test_wire_serde.py``. ``Refused`` is how a handler says no: it
carries the status the caller receives (``Status`` names the gRPC codes the services use) and a
message that says why; the servicers in ``offsite.wire.servicers`` turn it into the call's status.
``Peer`` is who is calling, as the transport established it (address, client certificate).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, unique


@unique
class Status(Enum):
    """Why a call was refused; each member is the gRPC status code of the same name."""

    INVALID_ARGUMENT = "invalid-argument"  # the request itself is wrong
    NOT_FOUND = "not-found"
    OUT_OF_RANGE = "out-of-range"
    UNAUTHENTICATED = "unauthenticated"  # no client certificate
    PERMISSION_DENIED = "permission-denied"  # known caller, not allowed (revoked, bad token)
    RESOURCE_EXHAUSTED = "resource-exhausted"  # rate-limited
    FAILED_PRECONDITION = "failed-precondition"  # this server cannot do that at all
    UNAVAILABLE = "unavailable"  # a dependency failed; retrying may help


class Refused(Exception):
    """A handler refused a call: the caller gets ``status`` and ``message`` (keep secrets out)."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Peer:
    """The caller of one call: its address without the port and, over mutual TLS, the sha256
    fingerprint of its client certificate (None without one)."""

    host: str
    fingerprint: str | None = None


# ---------------------------------------------------------------- ArtifactService


@dataclass(frozen=True)
class StatRequest:
    digest: str  # sha256, 64 lowercase hex characters


@dataclass(frozen=True)
class ArtifactStat:
    """An artifact the coordinator holds (``StatResponse``)."""

    digest: str
    kind: str
    size: int
    chunk_size: int  # the largest chunk a download sends


@dataclass(frozen=True)
class DownloadRequest:
    digest: str
    offset: int = 0  # resume here


@dataclass(frozen=True)
class Chunk:
    offset: int
    data: bytes = field(repr=False)


# ---------------------------------------------------------------- EnrollmentService, NodeService


@dataclass(frozen=True)
class EnrollRequest:
    token: str = field(repr=False)  # one-time secret: never in a log line
    node_name: str
    csr_pem: bytes = field(repr=False)
    flower_public_key: bytes


@dataclass(frozen=True)
class EnrollGrant:
    """What an enrolled node receives (``EnrollResponse``)."""

    certificate_pem: bytes = field(repr=False)
    ca_certificate_pem: bytes = field(repr=False)
    signing_public_key: bytes  # Ed25519, raw 32 bytes: signs bundle manifests
    artifact_port: int  # mutual TLS, same host
    superlink_port: int  # Flower Fleet API, same host; 0 = none
    app_signing_public_key: str  # OpenSSH Ed25519: signs the only Flower app nodes run
    app_signing_key_id: str  # its Flower trusted-entity id


@dataclass(frozen=True)
class RenewFlowerKeyRequest:
    flower_public_key: bytes


@dataclass(frozen=True)
class RenewFlowerKeyReply:
    """``RenewFlowerKeyResponse``: True, the node uses the new key; False, it keeps its own."""

    renewed: bool
