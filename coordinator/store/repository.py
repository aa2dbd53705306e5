"""The registry's operations. Each one is a transaction that has committed when it returns."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select, update
from sqlalchemy.exc import IntegrityError as DbIntegrityError
from sqlalchemy.orm import Session, sessionmaker

from coordinator.store.engine import default_url, make_engine, upgrade
from coordinator.store.schema import (
    Artifact,
    Checkpoint,
    EnrollmentToken,
    Node,
    Round,
    Run,
)
from coordinator.store.schema import (
    Update as UpdateRow,
)
from offsite.errors import ExitCode, OffsiteError


class StoreError(OffsiteError):
    """A registry operation was refused (unknown, used or expired token; conflicting data)."""

    exit_code = ExitCode.REGISTRY


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _aware(value: datetime) -> datetime:
    """SQLite returns naive datetimes; everything stored is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class NodeInfo:
    id: int
    name: str
    fingerprint: str
    status: str


@dataclass(frozen=True)
class FlowerKey:
    """A node's SuperNode authentication key and its SuperLink registration."""

    name: str
    public_key: str  # OpenSSH format
    flower_node_id: str | None
    active: bool


class Store:
    """The coordinator's registry over one database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # ------------------------------------------------------------------ nodes and tokens

    def mint_token(self, ttl: timedelta = timedelta(hours=24)) -> str:
        """A new one-time enrollment token (only its hash is stored)."""
        token = secrets.token_urlsafe(32)
        with self._tx() as s:
            s.add(EnrollmentToken(token_hash=token_hash(token), expires_at=_now() + ttl))
        return token

    def enroll(
        self,
        token: str,
        name: str,
        fingerprint: str | Callable[[], str],
        flower_key: str = "",
    ) -> NodeInfo:
        """Consume ``token`` and register the node, atomically; refused tokens change nothing.

        ``fingerprint`` may be a function (issue the certificate, return its fingerprint): it
        runs only once the token proved valid and unused and the name free, inside the same
        transaction, so nothing is signed for a bad token and a failure leaves the token unused.
        """
        now = _now()
        try:
            with self._tx() as s:
                used = s.execute(
                    update(EnrollmentToken)
                    .where(
                        EnrollmentToken.token_hash == token_hash(token),
                        EnrollmentToken.used_at.is_(None),
                        EnrollmentToken.expires_at > now,
                    )
                    .values(used_at=now)
                )
                if used.rowcount != 1:  # type: ignore[attr-defined]  # an UPDATE's CursorResult
                    raise StoreError(self._token_problem(s, token))
                if s.scalar(select(Node.id).where(Node.name == name)) is not None:
                    raise StoreError(f"a node named {name!r} is already enrolled; pick another")
                self._refuse_shared_key(s, name, flower_key)
                node = Node(
                    name=name,
                    certificate_fingerprint=fingerprint() if callable(fingerprint) else fingerprint,
                    flower_public_key=flower_key,
                    status="active",
                    created_at=now,
                )
                s.add(node)
                s.flush()
                s.execute(
                    update(EnrollmentToken)
                    .where(EnrollmentToken.token_hash == token_hash(token))
                    .values(node_id=node.id)
                )
                return NodeInfo(node.id, node.name, node.certificate_fingerprint, node.status)
        except DbIntegrityError as err:
            raise StoreError(
                f"a node named {name!r} or with this certificate is already enrolled"
            ) from err

    def _token_problem(self, s: Session, token: str) -> str:
        row = s.scalar(
            select(EnrollmentToken).where(EnrollmentToken.token_hash == token_hash(token))
        )
        if row is None:
            return "unknown enrollment token; mint one with `offsite coordinator token`"
        if row.used_at is not None:
            return "this enrollment token was already used; tokens are one-time"
        return f"this enrollment token expired at {_aware(row.expires_at).isoformat()}"

    def revoke(self, name: str) -> bool:
        """Revoke node ``name``; False when no active node has that name."""
        with self._tx() as s:
            result = s.execute(
                update(Node)
                .where(Node.name == name, Node.status == "active")
                .values(status="revoked", revoked_at=_now())
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]  # an UPDATE's CursorResult

    def node(self, *, name: str | None = None, fingerprint: str | None = None) -> NodeInfo | None:
        with self._tx() as s:
            query = select(Node)
            query = query.where(Node.name == name) if name else query
            query = (
                query.where(Node.certificate_fingerprint == fingerprint) if fingerprint else query
            )
            row = s.scalar(query)
            return (
                None
                if row is None
                else NodeInfo(row.id, row.name, row.certificate_fingerprint, row.status)
            )

    def nodes(self) -> list[NodeInfo]:
        with self._tx() as s:
            rows = s.scalars(select(Node).order_by(Node.name))
            return [NodeInfo(r.id, r.name, r.certificate_fingerprint, r.status) for r in rows]

    def flower_out_of_sync(self) -> list[FlowerKey]:
        """Nodes whose SuperLink registration lags their status: active with a key but not
        registered, or revoked but still registered."""
        with self._tx() as s:
            rows = s.scalars(
                select(Node).where(
                    (
                        (Node.status == "active")
                        & (Node.flower_public_key != "")
                        & Node.flower_node_id.is_(None)
                    )
                    | ((Node.status != "active") & Node.flower_node_id.is_not(None))
                )
            )
            return [
                FlowerKey(r.name, r.flower_public_key, r.flower_node_id, r.status == "active")
                for r in rows
            ]

    def set_flower_node_id(self, name: str, node_id: str | None) -> None:
        with self._tx() as s:
            s.execute(update(Node).where(Node.name == name).values(flower_node_id=node_id))

    def flower_keys(self) -> list[FlowerKey]:
        """Every node's SuperNode key and registration (what the SuperLink must hold)."""
        with self._tx() as s:
            rows = s.scalars(select(Node).order_by(Node.name))
            return [
                FlowerKey(r.name, r.flower_public_key, r.flower_node_id, r.status == "active")
                for r in rows
            ]

    @staticmethod
    def _refuse_shared_key(s: Session, name: str, flower_key: str) -> None:
        """One SuperNode key belongs to one node, ever (revoking one must not drop another)."""
        if not flower_key:
            return
        owner = s.scalar(
            select(Node.name).where(Node.flower_public_key == flower_key, Node.name != name)
        )
        if owner is not None:
            raise StoreError("this Flower key belongs to another node; make a new one")

    def set_flower_key(self, name: str, public_key: str) -> None:
        """Replace a node's SuperNode key ("" = none until the node sends one); the new key is
        not registered yet. A key another node holds is refused."""
        with self._tx() as s:
            self._refuse_shared_key(s, name, public_key)
            s.execute(
                update(Node)
                .where(Node.name == name)
                .values(flower_public_key=public_key, flower_node_id=None)
            )

    def is_allowed(self, fingerprint: str) -> bool:
        """Whether a peer certificate belongs to an enrolled, unrevoked node (read per request)."""
        found = self.node(fingerprint=fingerprint)
        return found is not None and found.status == "active"

    # ------------------------------------------------------------------ artifacts

    def put_artifact(self, digest: str, kind: str, size: int, path: Path | str) -> bool:
        """Register a content-addressed artifact; False when it was already there (idempotent)."""
        with self._tx() as s:
            existing = s.get(Artifact, digest)
            if existing is not None:
                if existing.size != size:
                    raise StoreError(f"artifact {digest[:12]} is registered with another size")
                return False
            s.add(Artifact(digest=digest, kind=kind, size=size, path=str(path), created_at=_now()))
            return True

    def artifact(self, digest: str) -> dict[str, Any] | None:
        with self._tx() as s:
            row = s.get(Artifact, digest)
            return (
                None
                if row is None
                else {"digest": row.digest, "kind": row.kind, "size": row.size, "path": row.path}
            )

    # ------------------------------------------------------------------ runs, rounds, updates

    def create_run(self, name: str, config: dict[str, Any], bundle_digest: str, rounds: int) -> int:
        with self._tx() as s:
            run = Run(
                name=name,
                config=config,
                bundle_digest=bundle_digest,
                rounds=rounds,
                status="running",
                created_at=_now(),
            )
            s.add(run)
            s.flush()
            return run.id

    def run_id(self, name: str) -> int | None:
        with self._tx() as s:
            return s.scalar(select(Run.id).where(Run.name == name))

    def open_round(self, run_id: int, number: int) -> int:
        """The round's id, creating it if needed (a resumed coordinator reopens it)."""
        with self._tx() as s:
            found = s.scalar(select(Round).where(Round.run_id == run_id, Round.number == number))
            if found is not None:
                return found.id
            row = Round(run_id=run_id, number=number, status="open", outcome="", started_at=_now())
            s.add(row)
            s.flush()
            return row.id

    def record_update(
        self,
        round_id: int,
        node_id: int,
        digest: str,
        num_examples: int,
        status: str = "accepted",
        reason: str = "",
    ) -> bool:
        """Store one client's reply; True once committed, False for an identical re-send.

        A second, different reply from the same node in the same round is refused.
        """
        with self._tx() as s:
            existing = s.scalar(
                select(UpdateRow).where(
                    UpdateRow.round_id == round_id, UpdateRow.node_id == node_id
                )
            )
            if existing is not None:
                if existing.digest == digest:
                    return False
                raise StoreError(f"node {node_id} already sent a different update this round")
            s.add(
                UpdateRow(
                    round_id=round_id,
                    node_id=node_id,
                    digest=digest,
                    num_examples=num_examples,
                    status=status,
                    reason=reason,
                    received_at=_now(),
                )
            )
            return True

    def updates(self, round_id: int) -> list[dict[str, Any]]:
        with self._tx() as s:
            rows = s.scalars(
                select(UpdateRow).where(UpdateRow.round_id == round_id).order_by(UpdateRow.node_id)
            )
            return [
                {
                    "node_id": r.node_id,
                    "digest": r.digest,
                    "num_examples": r.num_examples,
                    "status": r.status,
                    "reason": r.reason,
                }
                for r in rows
            ]

    def close_round(
        self,
        round_id: int,
        outcome: str,
        global_digest: str | None,
        epsilon: float | None = None,
        failed: bool = False,
    ) -> None:
        with self._tx() as s:
            s.execute(
                update(Round)
                .where(Round.id == round_id)
                .values(
                    status="failed" if failed else "closed",
                    outcome=outcome,
                    global_digest=global_digest,
                    epsilon=epsilon,
                    finished_at=_now(),
                )
            )

    def last_closed_round(self, run_id: int) -> int:
        """The highest round number that closed successfully (0 = none): where to resume."""
        with self._tx() as s:
            value = s.scalar(
                select(func.max(Round.number)).where(
                    Round.run_id == run_id, Round.status == "closed"
                )
            )
            return int(value or 0)

    def add_checkpoint(self, run_id: int, round_number: int, artifact_digest: str) -> None:
        with self._tx() as s:
            s.add(
                Checkpoint(
                    run_id=run_id,
                    round_number=round_number,
                    artifact_digest=artifact_digest,
                    created_at=_now(),
                )
            )

    def checkpoint(self, run_id: int, round_number: int) -> str | None:
        with self._tx() as s:
            return s.scalar(
                select(Checkpoint.artifact_digest).where(
                    Checkpoint.run_id == run_id, Checkpoint.round_number == round_number
                )
            )

    def finish_run(self, run_id: int, status: str = "finished") -> None:
        with self._tx() as s:
            s.execute(update(Run).where(Run.id == run_id).values(status=status, finished_at=_now()))


def open_store(url_or_state_dir: str | Path) -> Store:
    """Open (and migrate) the registry at a database URL or in a state folder (SQLite)."""
    text = str(url_or_state_dir)
    url = text if "://" in text else default_url(text)
    engine = make_engine(url)
    upgrade(engine)
    return Store(engine)
