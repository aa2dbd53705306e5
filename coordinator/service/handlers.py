"""What the coordinator's gRPC services decide: enrollment, artifacts, node key renewal.

Plain classes over the registry, the PKI and the artifact files; no gRPC, no protobuf. They take
the caller (``Peer``: address and client-certificate fingerprint, as the transport saw them)
and a request from ``offsite.wire.domain``, and return a domain value or raise ``Refused`` with
the status the caller gets. The thin servicers of ``offsite.wire.servicers`` serve them.

- Artifact and node calls check, on every call, that the caller's certificate fingerprint
  belongs to an enrolled, unrevoked node (read from the registry, so a revocation needs no
  restart). Without TLS (``require_node=False``, loopback demos) artifacts are served to anyone.
- Enrollment checks everything the node sent before the token is touched, and signs the
  certificate only inside the token's transaction, once the token proved good. Refusals are
  audited with the name the caller claimed, never the token.
- Rate limits are per caller address (enrollment) and per node (renewals), in memory.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from coordinator.service.artifact_files import CHUNK, ArtifactFiles
from coordinator.service.audit import Audit
from coordinator.service.pki import (
    Pki,
    PkiError,
    app_signer,
    check_csr,
    issue_certificate,
    signing_public_key,
)
from coordinator.store import Store
from coordinator.store.repository import StoreError
from offsite.crypto import canonical_flower_key, fingerprint
from offsite.digests import is_sha256
from offsite.errors import OffsiteError
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
    Status,
)

ENROLL_ATTEMPTS = (30, 60.0)  # per caller address and minute: enough for any real onboarding
RENEWALS = (6, 60.0)  # per node and minute: a SuperNode restarts far less often


def require_node(store: Store, peer: Peer) -> str:
    """The calling node's name; Refused when it showed no certificate, or one of a node that is
    unknown or revoked."""
    if peer.fingerprint is None:
        raise Refused(Status.UNAUTHENTICATED, "a client certificate is required")
    node = store.node(fingerprint=peer.fingerprint)
    if node is None or node.status != "active":
        raise Refused(Status.PERMISSION_DENIED, "this node is not enrolled or was revoked")
    return node.name


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


class ArtifactHandler:
    """ArtifactService: content-addressed files, download only (nodes store nothing here)."""

    def __init__(self, store: Store, files: ArtifactFiles, require_node: bool = True) -> None:
        self.store, self.files, self.require_node = store, files, require_node

    def _known(self, peer: Peer, digest: str) -> dict[str, Any]:
        if self.require_node:
            require_node(self.store, peer)
        if not is_sha256(digest):
            raise Refused(Status.INVALID_ARGUMENT, "digest must be 64 lowercase hex")
        found = self.store.artifact(digest)
        if found is None or not self.files.path(digest).is_file():
            raise Refused(Status.NOT_FOUND, f"no artifact {digest}")
        return found

    def stat(self, peer: Peer, request: StatRequest) -> ArtifactStat:
        found = self._known(peer, request.digest)
        return ArtifactStat(
            digest=found["digest"], kind=found["kind"], size=found["size"], chunk_size=CHUNK
        )

    def download(self, peer: Peer, request: DownloadRequest) -> Iterator[Chunk]:
        """Chunks of at most ``CHUNK`` bytes from ``request.offset``; refusals are raised here,
        before the first chunk is read."""
        found = self._known(peer, request.digest)
        if request.offset > found["size"]:
            raise Refused(Status.OUT_OF_RANGE, f"offset beyond {found['size']} bytes")
        return _read_chunks(self.files.path(request.digest), request.offset)


def _read_chunks(path: Path, offset: int) -> Iterator[Chunk]:
    with path.open("rb") as handle:
        handle.seek(offset)
        while data := handle.read(CHUNK):
            yield Chunk(offset=offset, data=data)
            offset += len(data)


class EnrollmentHandler:
    """EnrollmentService: a one-time token and a CSR for a certificate and the coordinator's
    keys. ``artifact_port``, ``superlink_port`` and ``on_enrolled`` are set by whoever serves
    it once they are known."""

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

    def enroll(self, peer: Peer, request: EnrollRequest) -> EnrollGrant:
        name = request.node_name
        if not self.attempts.allow(peer.host):
            raise Refused(
                Status.RESOURCE_EXHAUSTED,
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
            self._refused(name, peer.host, err)
            raise Refused(Status.INVALID_ARGUMENT, str(err)) from err
        except StoreError as err:
            self._refused(name, peer.host, err)
            raise Refused(Status.PERMISSION_DENIED, str(err)) from err
        self._record("enrolled", node=name, fingerprint=node.fingerprint)
        if self.on_enrolled is not None:
            self.on_enrolled()
        signer = app_signer(self.pki)
        return EnrollGrant(
            certificate_pem=issued[0],
            ca_certificate_pem=self.pki.ca_cert.read_bytes(),
            signing_public_key=signing_public_key(self.pki),
            artifact_port=self.artifact_port,
            superlink_port=self.superlink_port,
            app_signing_public_key=signer.public_key,
            app_signing_key_id=signer.key_id,
        )


class NodeHandler:
    """NodeService: calls of enrolled nodes about their own registration."""

    def __init__(self, store: Store, audit: Audit | None = None) -> None:
        self.store, self.audit = store, audit
        self.renewals = RateLimit(*RENEWALS)
        # decides a renewal: (node name, new key) -> renewed?; None: no SuperLink here
        self.renew: Callable[[str, str], bool] | None = None

    def renew_flower_key(self, peer: Peer, request: RenewFlowerKeyRequest) -> RenewFlowerKeyReply:
        name = require_node(self.store, peer)
        if self.renew is None:
            raise Refused(Status.FAILED_PRECONDITION, "no SuperLink runs here")
        if not self.renewals.allow(name):
            raise Refused(
                Status.RESOURCE_EXHAUSTED, "too many key renewals from this node; wait a minute"
            )
        try:
            key = canonical_flower_key(request.flower_public_key)
            renewed = self.renew(name, key)
        except (ValueError, UnicodeDecodeError, StoreError) as err:
            raise Refused(Status.INVALID_ARGUMENT, str(err)) from err
        except OffsiteError as err:
            raise Refused(Status.UNAVAILABLE, str(err)) from err
        return RenewFlowerKeyReply(renewed=renewed)
