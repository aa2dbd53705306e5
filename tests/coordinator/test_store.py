"""One contract suite for the registry, run against SQLite and a real PostgreSQL server."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from coordinator.store import open_store
from coordinator.store.engine import current_revision, downgrade, table_names
from coordinator.store.repository import StoreError


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    pytest.fail(
        "PostgreSQL server binaries not found: install them (Debian: apt-get install "
        "postgresql); make test does this (scripts/system-packages.sh)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throw-away PostgreSQL cluster on loopback (as the postgres user when run as root;
    outside pytest's private temp folders, which that user cannot enter)."""
    bindir = _pg_bin()
    root = Path(tempfile.mkdtemp(prefix="offsite-pg-"))
    data = root / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True)  # noqa: E731
    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    run(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(root / "log"),
        "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
        "-w",
        "start",
    )
    try:
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        yield url
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop")
        shutil.rmtree(root, ignore_errors=True)


_counter = iter(range(10**6))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "state")
    base = request.getfixturevalue("postgres_url")
    import sqlalchemy as sa

    name = f"t{next(_counter)}_{int(time.time() * 1000) % 10**8}"
    engine = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sa.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return base.rsplit("/", 1)[0] + f"/{name}"


def test_schema_is_created_by_migrations_and_reversible(store_url: str) -> None:
    store = open_store(store_url)
    assert current_revision(store.engine) == "0002"
    assert {"nodes", "enrollment_tokens", "artifacts", "runs", "rounds", "updates"} <= table_names(
        store.engine
    )
    open_store(store_url)  # idempotent
    downgrade(store.engine, "base")
    assert "nodes" not in table_names(store.engine)


def test_tokens_are_one_time_hashed_and_expire(store_url: str) -> None:
    store = open_store(store_url)
    token = store.mint_token()
    node = store.enroll(token, "clinic-a", "ab" * 32)
    assert node.status == "active" and store.is_allowed("ab" * 32)
    with pytest.raises(StoreError, match="already used"):
        store.enroll(token, "clinic-b", "cd" * 32)
    with pytest.raises(StoreError, match="unknown"):
        store.enroll("not-a-token", "clinic-b", "cd" * 32)
    expired = store.mint_token(ttl=timedelta(seconds=-1))
    with pytest.raises(StoreError, match="expired"):
        store.enroll(expired, "clinic-b", "cd" * 32)
    assert store.node(name="clinic-b") is None  # refused enrollments leave nothing behind
    from sqlalchemy import text

    with store.engine.connect() as connection:
        stored = [
            row[0] for row in connection.execute(text("SELECT token_hash FROM enrollment_tokens"))
        ]
    assert token not in stored and all(len(h) == 64 for h in stored)


def test_revocation_takes_effect_and_survives_a_restart(store_url: str) -> None:
    store = open_store(store_url)
    store.enroll(store.mint_token(), "clinic-a", "ab" * 32)
    assert store.revoke("clinic-a") and not store.is_allowed("ab" * 32)
    assert not store.revoke("clinic-a")  # already revoked
    store.engine.dispose()
    reopened = open_store(store_url)
    assert not reopened.is_allowed("ab" * 32)
    with pytest.raises(StoreError, match="already enrolled"):
        reopened.enroll(reopened.mint_token(), "clinic-a", "ef" * 32)


def test_updates_are_idempotent_and_rounds_resume(store_url: str) -> None:
    store = open_store(store_url)
    node = store.enroll(store.mint_token(), "clinic-a", "ab" * 32)
    run = store.create_run("run-1", {"federation": {"rounds": 3}}, "f" * 64, 3)
    first = store.open_round(run, 1)
    assert store.record_update(first, node.id, "1" * 64, 120)
    assert not store.record_update(first, node.id, "1" * 64, 120)  # re-sent: acknowledged once
    with pytest.raises(StoreError, match="different update"):
        store.record_update(first, node.id, "2" * 64, 120)
    assert store.put_artifact("a" * 64, "adapter", 10, "/tmp/x")
    assert not store.put_artifact("a" * 64, "adapter", 10, "/tmp/x")
    store.close_round(first, "aggregated 1 updates", "a" * 64, epsilon=1.5)
    store.add_checkpoint(run, 1, "a" * 64)
    second = store.open_round(run, 2)  # the coordinator dies during round 2
    store.engine.dispose()

    resumed = open_store(store_url)
    run_again = resumed.run_id("run-1")
    assert run_again == run and resumed.last_closed_round(run) == 1
    assert resumed.checkpoint(run, 1) == "a" * 64
    assert resumed.open_round(run, 2) == second  # reopened, not duplicated
    assert resumed.updates(first) == [
        {
            "node_id": node.id,
            "digest": "1" * 64,
            "num_examples": 120,
            "status": "accepted",
            "reason": "",
        }
    ]


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    store = open_store(tmp_path / "state")
    with store.engine.connect() as connection:
        from sqlalchemy import text

        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert connection.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL


def test_concurrent_replies_store_exactly_one_row_each(store_url: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    store = open_store(store_url)
    nodes = [store.enroll(store.mint_token(), f"n{i}", f"{i:064x}") for i in range(50)]
    run = store.create_run("run", {}, "f" * 64, 1)
    round_id = store.open_round(run, 1)

    def send(node_id: int) -> bool:
        return store.record_update(round_id, node_id, "a" * 64, 10)

    with ThreadPoolExecutor(max_workers=8) as pool:
        first = list(pool.map(send, [n.id for n in nodes]))
        again = list(pool.map(send, [n.id for n in nodes]))  # duplicates after a lost ack
    assert all(first) and not any(again)
    assert len(store.updates(round_id)) == 50


def test_flower_registrations_follow_node_status(store_url: str) -> None:
    store = open_store(store_url)
    store.enroll(store.mint_token(), "site-a", "ab" * 32, "ecdsa-sha2-nistp384 AAAA a")
    store.enroll(store.mint_token(), "site-b", "cd" * 32)  # no Flower key: nothing to register
    pending = store.flower_out_of_sync()
    assert [(k.name, k.active, k.flower_node_id) for k in pending] == [("site-a", True, None)]
    store.set_flower_node_id("site-a", "123")
    assert store.flower_out_of_sync() == []
    store.revoke("site-a")
    assert [(k.name, k.active, k.flower_node_id) for k in store.flower_out_of_sync()] == [
        ("site-a", False, "123")
    ]
    store.set_flower_node_id("site-a", None)
    assert store.flower_out_of_sync() == []
    downgrade(store.engine, "0001")
    assert current_revision(store.engine) == "0001"
    assert current_revision(open_store(store_url).engine) == "0002"
