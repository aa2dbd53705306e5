"""Nodes remember the id the Flower SuperLink gave their registered authentication key.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    # plain ALTER TABLE (no batch copy: SQLite would rebuild a table others reference)
    op.add_column("nodes", sa.Column("flower_node_id", sa.String(32), nullable=True))


def downgrade() -> None:
    op.drop_column("nodes", "flower_node_id")
