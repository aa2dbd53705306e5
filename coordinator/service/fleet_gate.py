"""The Fleet gate: nginx lets a Fleet API call through only when an admitted SuperNode signed it.

Flower authenticates Fleet calls itself, but only after it has read and parsed the whole request
body (up to the proxy's body limit): an outsider could make the SuperLink buffer hundreds of MB
per request without any key. So nginx first asks this loopback service (``auth_request``, headers
only, before any body is read) whether the call carries Flower's SuperNode signature — an ECDSA
signature over a fresh timestamp, with Flower's own tolerance — by a key the registry admits
(an enrolled, unrevoked node's registered key). Flower then checks everything again, including
that the node id matches the key.

The admitted keys are pushed here by the daemon after every reconcile, so a revoked node is shut
out at the proxy within seconds.
"""

from __future__ import annotations

import binascii
import datetime as dt
import threading
from base64 import b64decode
from collections.abc import Iterable, Mapping

# imported here, in the importing thread: importing Flower lazily inside the HTTP handler thread
# deadlocked once against the main thread importing flwr (Python's per-module import locks)
from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature

from coordinator.service.loopback_http import LoopbackHTTP

PATH = "/fleet-auth"
# flwr 1.41's Fleet HTTP authentication headers and tolerances (flwr.supercore.constant,
# flwr.common.constant); the SuperLink applies the same ones after us
PUBLIC_KEY_HEADER = "flwr-public-key"
SIGNATURE_HEADER = "flwr-signature"
TIMESTAMP_HEADER = "flwr-timestamp"
TIMESTAMP_TOLERANCE = 300.0
SYSTEM_TIME_TOLERANCE = 5.0


class FleetGate:
    """Answers nginx's ``auth_request``: 204 for a call signed by an admitted key, else 401."""

    def __init__(self) -> None:
        self._admitted: frozenset[bytes] = frozenset()
        self._lock = threading.Lock()
        self.http = LoopbackHTTP(self._answer, "fleet-gate")

    def admit(self, public_keys: Iterable[bytes]) -> None:
        """Replace the admitted SuperNode keys (PEM SubjectPublicKeyInfo, as Flower sends them)."""
        with self._lock:
            self._admitted = frozenset(bytes(k) for k in public_keys)

    def allows(self, headers: Mapping[str, str]) -> bool:
        try:
            public_key = b64decode(headers[PUBLIC_KEY_HEADER], validate=True)
            signature = b64decode(headers[SIGNATURE_HEADER], validate=True)
            timestamp = headers[TIMESTAMP_HEADER]
            signed_at = dt.datetime.fromisoformat(timestamp)
            if signed_at.tzinfo is None:
                return False
            age = (dt.datetime.now(dt.timezone.utc) - signed_at).total_seconds()
            if not -SYSTEM_TIME_TOLERANCE < age < TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE:
                return False
            with self._lock:
                if public_key not in self._admitted:
                    return False
            return bool(
                verify_signature(
                    bytes_to_public_key(public_key), timestamp.encode("ascii"), signature
                )
            )
        except (KeyError, ValueError, TypeError, UnicodeError, binascii.Error):
            return False

    def _answer(
        self, _method: str, path: str, headers: Mapping[str, str], _body: bytes
    ) -> tuple[int, str, bytes]:
        if path == PATH and self.allows(headers):
            return 204, "text/plain", b""
        return 401, "text/plain", b"not a call signed by an admitted SuperNode"

    @property
    def port(self) -> int:
        return self.http.port

    def start(self) -> FleetGate:
        self.http.start()
        return self

    def stop(self) -> None:
        self.http.stop()
