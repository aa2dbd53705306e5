"""Initial registry: nodes, enrollment tokens, artifacts, runs, rounds, updates, checkpoints.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def _when(name: str, nullable: bool = False) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("certificate_fingerprint", sa.String(64), nullable=False, unique=True),
        sa.Column("flower_public_key", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        _when("created_at"),
        _when("revoked_at", nullable=True),
    )
    op.create_table(
        "enrollment_tokens",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        _when("expires_at"),
        _when("used_at", nullable=True),
        sa.Column("node_id", sa.Integer, sa.ForeignKey("nodes.id"), nullable=True),
    )
    op.create_table(
        "artifacts",
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        _when("created_at"),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("bundle_digest", sa.String(64), nullable=False),
        sa.Column("rounds", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        _when("created_at"),
        _when("finished_at", nullable=True),
    )
    op.create_table(
        "rounds",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("epsilon", sa.Float, nullable=True),
        sa.Column("global_digest", sa.String(64), nullable=True),
        _when("started_at"),
        _when("finished_at", nullable=True),
        sa.UniqueConstraint("run_id", "number"),
    )
    op.create_table(
        "updates",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("round_id", sa.Integer, sa.ForeignKey("rounds.id"), nullable=False),
        sa.Column("node_id", sa.Integer, sa.ForeignKey("nodes.id"), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("num_examples", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        _when("received_at"),
        sa.UniqueConstraint("round_id", "node_id"),
    )
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("round_number", sa.Integer, nullable=False),
        sa.Column(
            "artifact_digest", sa.String(64), sa.ForeignKey("artifacts.digest"), nullable=False
        ),
        _when("created_at"),
        sa.UniqueConstraint("run_id", "round_number"),
    )


def downgrade() -> None:
    for table in (
        "checkpoints",
        "updates",
        "rounds",
        "runs",
        "artifacts",
        "enrollment_tokens",
        "nodes",
    ):
        op.drop_table(table)
