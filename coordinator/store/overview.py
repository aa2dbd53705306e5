"""Read-only views of the registry for the operator dashboard: a few grouped queries per page.

Each function is one read transaction returning frozen records (no ORM objects escape), sized
for a page: every node with its status, every run with its round counts, one run's rounds,
every artifact with the runs whose checkpoints it holds. The dashboard's benchmark (1,000 nodes,
100 runs) keeps each of them to a few milliseconds on SQLite.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from coordinator.store.repository import Store
from coordinator.store.schema import Artifact, Checkpoint, EnrollmentToken, Node, Round, Run


def _aware(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything stored is UTC."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class NodeRecord:
    """An enrolled node as the registry holds it."""

    name: str
    status: str  # active | revoked
    fingerprint: str
    flower_node_id: str | None  # the SuperLink's id while registered
    has_flower_key: bool
    created_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class RunRecord:
    """A run with its round counts (closed, failed, open) and its latest activity."""

    id: int
    name: str
    status: str  # the registry's status: running | finished | failed
    rounds: int  # rounds asked for
    bundle_digest: str
    config: dict[str, Any]
    created_at: datetime | None
    finished_at: datetime | None
    closed: int
    failed: int
    opened: int
    last_activity: datetime | None


@dataclass(frozen=True)
class RoundRecord:
    number: int
    status: str  # open | closed | failed
    outcome: str
    epsilon: float | None
    global_digest: str | None
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def seconds(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


@dataclass(frozen=True)
class ArtifactRecord:
    digest: str
    kind: str  # bundle | adapter | …
    size: int
    path: str
    created_at: datetime | None
    checkpoint_of: tuple[int, ...]  # ids of the runs whose round checkpoint this is


def node_records(store: Store) -> list[NodeRecord]:
    """Every enrolled node, by name."""
    with Session(store.engine) as s:
        rows = s.execute(
            select(
                Node.name,
                Node.status,
                Node.certificate_fingerprint,
                Node.flower_node_id,
                Node.flower_public_key != "",
                Node.created_at,
                Node.revoked_at,
            ).order_by(Node.name)
        )
        return [
            NodeRecord(r[0], r[1], r[2], r[3], bool(r[4]), _aware(r[5]), _aware(r[6])) for r in rows
        ]


def open_tokens(store: Store) -> int:
    """Enrollment tokens minted, unused and unexpired."""
    now = datetime.now(timezone.utc)
    with Session(store.engine) as s:
        count = s.scalar(
            select(func.count(EnrollmentToken.id)).where(
                EnrollmentToken.used_at.is_(None), EnrollmentToken.expires_at > now
            )
        )
        return int(count or 0)


def _run_query() -> Any:
    counts = (
        select(
            Round.run_id.label("run_id"),
            func.sum(case((Round.status == "closed", 1), else_=0)).label("closed"),
            func.sum(case((Round.status == "failed", 1), else_=0)).label("failed"),
            func.sum(case((Round.status == "open", 1), else_=0)).label("opened"),
            func.max(func.coalesce(Round.finished_at, Round.started_at)).label("last"),
        )
        .group_by(Round.run_id)
        .subquery()
    )
    return select(Run, counts.c.closed, counts.c.failed, counts.c.opened, counts.c.last).join(
        counts, counts.c.run_id == Run.id, isouter=True
    )


def _run_record(row: Any) -> RunRecord:
    run, closed, failed, opened, last = row
    created = _aware(run.created_at)
    return RunRecord(
        id=run.id,
        name=run.name,
        status=run.status,
        rounds=run.rounds,
        bundle_digest=run.bundle_digest,
        config=dict(run.config or {}),
        created_at=created,
        finished_at=_aware(run.finished_at),
        closed=int(closed or 0),
        failed=int(failed or 0),
        opened=int(opened or 0),
        last_activity=_aware(last) or created,
    )


def run_records(store: Store) -> list[RunRecord]:
    """Every run with its round counts, newest first."""
    with Session(store.engine) as s:
        return [_run_record(r) for r in s.execute(_run_query().order_by(Run.id.desc()))]


def run_record(store: Store, run_id: int) -> RunRecord | None:
    with Session(store.engine) as s:
        row = s.execute(_run_query().where(Run.id == run_id)).first()
        return None if row is None else _run_record(row)


def _round_record(r: Round) -> RoundRecord:
    return RoundRecord(
        r.number,
        r.status,
        r.outcome,
        r.epsilon,
        r.global_digest,
        _aware(r.started_at),
        _aware(r.finished_at),
    )


def round_records(store: Store, run_id: int) -> list[RoundRecord]:
    """The run's rounds in order."""
    with Session(store.engine) as s:
        rows = s.scalars(select(Round).where(Round.run_id == run_id).order_by(Round.number))
        return [_round_record(r) for r in rows]


def rounds_by_run(store: Store) -> dict[int, list[RoundRecord]]:
    """Every run's rounds in order, in one query (the runs page)."""
    found: dict[int, list[RoundRecord]] = {}
    with Session(store.engine) as s:
        for r in s.scalars(select(Round).order_by(Round.run_id, Round.number)):
            found.setdefault(r.run_id, []).append(_round_record(r))
    return found


def artifact_records(store: Store) -> list[ArtifactRecord]:
    """Every artifact, newest first, with the runs whose checkpoints it is."""
    with Session(store.engine) as s:
        uses: dict[str, list[int]] = {}
        for digest, run_id in s.execute(
            select(Checkpoint.artifact_digest, Checkpoint.run_id).distinct()
        ):
            uses.setdefault(digest, []).append(run_id)
        rows = s.scalars(select(Artifact).order_by(Artifact.created_at.desc()))
        return [
            ArtifactRecord(
                a.digest,
                a.kind,
                a.size,
                a.path,
                _aware(a.created_at),
                tuple(sorted(uses.get(a.digest, []))),
            )
            for a in rows
        ]
