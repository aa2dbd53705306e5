"""The coordinator's audit trail: one JSON line per trust decision in ``<state>/audit.log``.

Enrollments, refused enrollments, revocations, key renewals and every change the registry
makes to the SuperLink are recorded with the node, the reason and a UTC time: never a token,
a key or a certificate body (node fingerprints only). Several processes append (``serve``,
``revoke``); each line is one ``write`` on an ``O_APPEND`` descriptor, so lines never interleave.
The file is created 0600.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.log"


class Audit:
    """Appends audit records for one coordinator state folder."""

    def __init__(self, state: Path) -> None:
        self.path = Path(state) / AUDIT_FILE

    def record(self, event: str, **fields: Any) -> None:
        """Append ``event`` with ``fields`` (plain values; callers never pass secrets)."""
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "event": event}
        entry.update({key: value for key, value in fields.items() if value is not None})
        line = (json.dumps(entry, sort_keys=False, default=str) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(descriptor, line)
        finally:
            os.close(descriptor)
        log.info("%s %s", event, " ".join(f"{k}={v}" for k, v in fields.items() if v is not None))

    def entries(self) -> list[dict[str, Any]]:
        """Every record so far (oldest first); an absent log has none."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]
