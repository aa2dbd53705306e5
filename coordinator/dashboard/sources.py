"""The dashboard's two sources of records (``reads.Source``): a coordinator and a runs folder.

- ``CoordinatorSource``: a coordinator's registry (its nodes, runs, artifacts), the SuperLink's
  node table while ``coordinator serve`` runs, and the folders its deployed runs wrote (a
  deployed run's registry name is its folder's path, ``coordinator.state.ledger``). Its two
  actions, minting an enrollment token and revoking a node, go through the registry and are
  written to the coordinator's audit log.
- ``RunsDirSource``: ``offsite dashboard RUNS_DIR``, the simulations under a folder, each with
  its own registry; it has no nodes and takes no action.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator.dashboard.reads import (
    ArtifactView,
    DashboardError,
    FileCache,
    NodesPage,
    NodeView,
    RunDetail,
    RunFiles,
    RunView,
    parse_iso,
    run_detail,
    run_view,
    when,
)
from coordinator.service.audit import Audit
from coordinator.state.folder import RunFolder
from coordinator.store import Store, open_store
from coordinator.store.overview import (
    NodeRecord,
    RoundRecord,
    RunRecord,
    artifact_records,
    node_records,
    open_tokens,
    round_records,
    rounds_by_run,
    run_record,
    run_records,
)
from offsite.errors import OffsiteError

LINK_SECONDS = 2.0  # the SuperLink's node table is asked at most this often

if TYPE_CHECKING:  # the wire module imports Flower; the dashboard only reads its rows
    from offsite.wire.flower_control import ControlNode


def _fingerprint(raw: bytes) -> str:
    return "SHA256:" + hashlib.sha256(raw).hexdigest()[:24]


@dataclass
class CoordinatorSource:
    """A coordinator's registry, its SuperLink and its deployed runs' folders."""

    state: Path
    store: Store
    superlink: Callable[[], list[ControlNode]] | None = None  # None: not serving
    app_key: str = ""  # the app-signing key id nodes pin at enrollment ("fpk_…")
    app_key_since: datetime | None = None  # nodes enrolled before it must join again
    bundle_key: bytes | None = None  # the raw Ed25519 key that signs bundles
    title: str = "coordinator"
    manageable: bool = True
    _files: RunFiles = field(default_factory=lambda: RunFiles(FileCache()))
    _link_cache: tuple[float, list[ControlNode] | None] | None = None

    def _held(self) -> list[ControlNode] | None:
        """The SuperLink's node table (None: not serving), asked at most every few seconds."""
        if self.superlink is None:
            return None
        now = time.monotonic()
        if self._link_cache is not None and now - self._link_cache[0] < LINK_SECONDS:
            return self._link_cache[1]
        try:
            held: list[ControlNode] | None = self.superlink()
        except (OffsiteError, OSError):
            held = None
        self._link_cache = (now, held)
        return held

    def forget_superlink(self) -> None:
        """Ask the SuperLink again on the next read (after a revocation)."""
        self._link_cache = None

    def _names(self, nodes: list[NodeRecord], held: list[ControlNode] | None) -> dict[str, str]:
        names = {n.node_id: n.name for n in held or [] if n.name}
        names.update({n.flower_node_id: n.name for n in nodes if n.flower_node_id})
        return names

    def _folder(self, record: RunRecord) -> RunFolder:
        return RunFolder(Path(record.name))

    def nodes(self) -> NodesPage:
        records = node_records(self.store)
        held = self._held()
        by_id = {n.node_id: n for n in held or []}
        by_name = {n.name: n for n in held or [] if n.status != "unregistered"}
        names = self._names(records, held)
        examples: dict[str, dict[str, int]] = {}
        for run in run_records(self.store):
            folder = self._folder(run)
            for reply in self._files.parsed(folder):
                name = names.get(reply.node_id)
                if reply.verdict == "accepted" and name is not None:
                    per_run = examples.setdefault(name, {})
                    per_run[folder.name] = per_run.get(folder.name, 0) + reply.examples
        now = datetime.now(timezone.utc)
        views = []
        for node in records:
            link = by_id.get(node.flower_node_id or "") or by_name.get(node.name)
            status = "not serving" if held is None else (link.status if link else "—")
            if link is not None and link.status == "online":
                seen = when(now)
            elif link is not None:
                seen = when(
                    parse_iso(link.last_deactivated_at) or parse_iso(link.last_activated_at)
                )
            else:
                seen = "—"
            pinned = (
                self.app_key
                if self.app_key
                and (self.app_key_since is None or (node.created_at or now) >= self.app_key_since)
                else ("must join again to pin the app key" if self.app_key else "—")
            )
            views.append(
                NodeView(
                    name=node.name,
                    status=node.status,
                    superlink=status,
                    last_seen=seen,
                    fingerprint=node.fingerprint,
                    app_key=pinned,
                    examples=tuple(sorted(examples.get(node.name, {}).items())),
                )
            )
        return NodesPage(views, self.app_key, open_tokens(self.store), held is not None, True)

    def _records(self) -> tuple[list[RunRecord], dict[str, str]]:
        return run_records(self.store), self._names(node_records(self.store), self._held())

    def runs(self) -> list[RunView]:
        runs, names = self._records()
        out = []
        every = rounds_by_run(self.store)
        for run in runs:
            rounds = every.get(run.id, [])
            out.append(run_view(str(run.id), self._folder(run), run, self._files, names, rounds))
        return out

    def run(self, key: str) -> RunDetail | None:
        if not key.isdigit() or (record := run_record(self.store, int(key))) is None:
            return None
        names = self._names(node_records(self.store), self._held())
        folder = self._folder(record)
        rounds = round_records(self.store, record.id)
        view = run_view(key, folder, record, self._files, names, rounds)
        return run_detail(
            view, folder, rounds, self._files, names, record.bundle_digest, self.bundle_key
        )

    def run_folder(self, key: str) -> RunFolder | None:
        if not key.isdigit() or (record := run_record(self.store, int(key))) is None:
            return None
        return self._folder(record)

    def artifacts(self) -> list[ArtifactView]:
        runs = run_records(self.store)
        labels = {r.id: (str(r.id), self._folder(r).name) for r in runs}
        bundle_users: dict[str, list[tuple[str, str]]] = {}
        for run in runs:
            folder = self._folder(run)
            try:
                artifact = folder.plan().bundle_artifact if folder.plan_path.is_file() else ""
            except (OSError, ValueError, KeyError, TypeError):
                artifact = ""
            if artifact:
                bundle_users.setdefault(artifact, []).append(labels[run.id])
        signer = _fingerprint(self.bundle_key) if self.bundle_key else "—"
        out = []
        for a in artifact_records(self.store):
            users = [labels[i] for i in a.checkpoint_of if i in labels]
            users += bundle_users.get(a.digest, [])
            out.append(
                ArtifactView(
                    a.digest,
                    a.kind,
                    a.size,
                    signer if a.kind == "bundle" else "— (the federation's aggregate)",
                    tuple(users),
                    a.created_at,
                )
            )
        return out

    def mint_token(self, hours: float) -> str:
        if not (math.isfinite(hours) and 0 < hours <= 24 * 90):
            raise DashboardError("hours must be a number in (0, 2160]")
        token = self.store.mint_token(timedelta(hours=hours))
        Audit(self.state).record("token-minted", hours=hours, by="dashboard")
        return token

    def revoke(self, name: str) -> None:
        if not self.store.revoke(name):
            raise DashboardError(f"no active node named {name!r}")
        Audit(self.state).record("revoked", node=name, by="dashboard")
        self.forget_superlink()


@dataclass
class RunsDirSource:
    """The simulations under one folder (``offsite dashboard RUNS_DIR``), each run folder with
    its own registry."""

    root: Path
    title: str = "simulations"
    manageable: bool = False
    _files: RunFiles = field(default_factory=lambda: RunFiles(FileCache()))
    _stores: dict[Path, Store] = field(default_factory=dict)

    def _folders(self) -> list[RunFolder]:
        found = []
        for path in sorted(self.root.iterdir(), reverse=True) if self.root.is_dir() else []:
            try:
                found.append(RunFolder.existing(path))
            except OffsiteError:
                continue
        return found

    def _store(self, folder: RunFolder) -> Store | None:
        if not folder.registry.is_dir():
            return None
        if folder.path not in self._stores:
            self._stores[folder.path] = open_store(folder.registry)
        return self._stores[folder.path]

    def _record(self, folder: RunFolder) -> tuple[RunRecord | None, list[RoundRecord]]:
        store = self._store(folder)
        if store is None:
            return None, []
        run_id = store.run_id(folder.name)
        if run_id is None:
            return None, []
        return run_record(store, run_id), round_records(store, run_id)

    def nodes(self) -> NodesPage:
        return NodesPage([], "", 0, False, False, "a simulation has no enrolled nodes")

    def runs(self) -> list[RunView]:
        out = []
        for folder in self._folders():
            record, rounds = self._record(folder)
            out.append(run_view(folder.name, folder, record, self._files, {}, rounds))
        return out

    def run_folder(self, key: str) -> RunFolder | None:
        if "/" in key or key in {"", ".", ".."}:
            return None
        try:
            return RunFolder.existing(self.root / key)
        except OffsiteError:
            return None

    def run(self, key: str) -> RunDetail | None:
        folder = self.run_folder(key)
        if folder is None:
            return None
        record, rounds = self._record(folder)
        view = run_view(key, folder, record, self._files, {}, rounds)
        digest = record.bundle_digest if record else ""
        return run_detail(view, folder, rounds, self._files, {}, digest, None)

    def artifacts(self) -> list[ArtifactView]:
        out = []
        for folder in self._folders():
            store = self._store(folder)
            for a in artifact_records(store) if store else []:
                out.append(
                    ArtifactView(
                        a.digest, a.kind, a.size, "—", ((folder.name, folder.name),), a.created_at
                    )
                )
        return out

    def mint_token(self, hours: float) -> str:
        raise DashboardError("a simulation has no enrollment; serve a coordinator")

    def revoke(self, name: str) -> None:
        raise DashboardError("a simulation has no enrolled nodes")
