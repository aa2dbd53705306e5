"""The coordinator's durable registry: nodes, enrollment tokens, artifacts, runs, rounds, updates.

SQLAlchemy 2.x schema with Alembic migrations; SQLite (WAL) in the coordinator's state folder by
default, PostgreSQL by URL. Every write commits before it is acknowledged.
"""

from coordinator.store.repository import Store, open_store

__all__ = ["Store", "open_store"]
