"""What the dashboard shows, read from the registry (``coordinator.store``) and each run's folder
(``coordinator.state.RunFolder``, the one owner of run files): plain records, no HTML.

Two sources feed the same pages:

- ``CoordinatorSource``: a coordinator's registry (its nodes, runs, artifacts), the SuperLink's
  node table while ``coordinator serve`` runs, and the folders its deployed runs wrote (a
  deployed run's registry name is its folder's path, ``coordinator.state.ledger``);
- ``RunsDirSource``: ``offsite dashboard RUNS_DIR``, the simulations under a folder, each with
  its own registry.

A run's state is derived, because the registry records rounds, not the process: a run whose
report has scores is *finished*; one whose report says it trained nothing is *failed*; one with
activity in the registry within its round timeout is *running*; otherwise it stopped mid-way,
*resumable* when its folder holds a plan (``offsite run --resume``), else *failed*.

Run files are re-read only when they change (cached by size and mtime), so a page over 100 runs
reads a few hundred ``stat`` results, not a few hundred JSON files.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol, TypeVar

from coordinator.dashboard.plots import Series, line_plot
from coordinator.service.audit import Audit
from coordinator.service.flower_link import SuperLinkNode
from coordinator.state.folder import RunFolder
from coordinator.state.health import short_error
from coordinator.store import Store, open_store
from coordinator.store.overview import (
    NodeRecord,
    RoundRecord,
    RunRecord,
    artifact_records,
    node_records,
    open_tokens,
    round_records,
    run_record,
    run_records,
)
from offsite.errors import IntegrityError, OffsiteError
from offsite.wire.messages import TrainReply

T = TypeVar("T")
STATES = ("running", "finished", "failed", "resumable")
LINK_SECONDS = 2.0  # the SuperLink's node table is asked at most this often
MIN_TIMEOUT = 60.0  # seconds of silence before a run without a round timeout counts as stopped


class DashboardError(OffsiteError):
    """A dashboard action was refused (unknown node, bad input)."""


# ---------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Reply:
    """One client reply in one round, as the ServerApp recorded it."""

    round: int
    client: str  # partition id (simulation) or node name (deployment)
    verdict: str  # accepted | dropped | quarantined
    reason: str
    examples: int
    loss: float | None
    node_id: str


@dataclass(frozen=True)
class RoundView:
    number: int
    status: str
    outcome: str
    seconds: float | None
    epsilon: float | None
    accepted: int
    dropped: int
    quarantined: int
    mean_loss: float | None
    losses: dict[str, float]  # client -> loss
    reasons: tuple[str, ...]  # "client: reason" of dropped / quarantined replies


@dataclass(frozen=True)
class RunView:
    key: str  # URL key
    label: str
    path: Path
    state: str  # one of STATES
    rounds: int
    closed: int
    failed_rounds: int
    model: str
    data: str
    aggregation: str
    accepted: int
    dropped: int
    quarantined: int
    last_loss: float | None
    last_round_seconds: float | None
    created_at: datetime | None

    @property
    def progress(self) -> str:
        return f"{self.closed}/{self.rounds}"


@dataclass(frozen=True)
class Score:
    title: str
    value: str
    interval: str  # "" when no interval is known


@dataclass(frozen=True)
class FileLink:
    label: str
    relative: str  # path under the run folder


@dataclass(frozen=True)
class RunDetail:
    run: RunView
    rounds: list[RoundView]
    clients: list[str]
    scores: list[Score]
    margins: list[str]
    privacy: str
    privacy_numbers: dict[str, Any]
    epsilon_budget: float | None
    epsilon_spent: float | None
    bundle_digest: str
    signature: str
    plots: list[str]  # PNG names in the run folder
    files: list[FileLink]
    loss_svg: str
    epsilon_svg: str
    warning: str
    config: dict[str, Any]


@dataclass(frozen=True)
class NodeView:
    name: str
    status: str  # active | revoked
    superlink: str  # online | offline | registered | unregistered | — | not serving
    last_seen: str
    fingerprint: str
    app_key: str
    examples: tuple[tuple[str, int], ...]  # (run label, examples reported)


@dataclass(frozen=True)
class NodesPage:
    nodes: list[NodeView]
    app_key: str
    open_tokens: int
    serving: bool
    manageable: bool
    note: str = ""


@dataclass(frozen=True)
class ArtifactView:
    digest: str
    kind: str
    size: int
    signer: str
    runs: tuple[tuple[str, str], ...]  # (run key, label)
    created_at: datetime | None


class Source(Protocol):
    """What the pages read (and the two actions they may take)."""

    title: str
    manageable: bool

    def nodes(self) -> NodesPage: ...
    def runs(self) -> list[RunView]: ...
    def run(self, key: str) -> RunDetail | None: ...
    def run_folder(self, key: str) -> RunFolder | None: ...
    def artifacts(self) -> list[ArtifactView]: ...
    def mint_token(self, hours: float) -> str: ...
    def revoke(self, name: str) -> None: ...


# ---------------------------------------------------------------------------------- helpers


class FileCache:
    """Values read from files, re-read only when the file's size or mtime changes."""

    def __init__(self) -> None:
        self._seen: dict[tuple[Path, str], tuple[tuple[int, int], Any]] = {}
        self._lock = threading.Lock()

    def get(self, path: Path, tag: str, read: Callable[[], T], empty: T) -> T:
        try:
            stat = path.stat()
        except OSError:
            return empty
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            hit = self._seen.get((path, tag))
        if hit is not None and hit[0] == stamp:
            return hit[1]  # type: ignore[no-any-return]
        value = read()
        with self._lock:
            self._seen[(path, tag)] = (stamp, value)
        return value


def wilson(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The 95 % Wilson score interval of a proportion."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _interval(score: dict[str, Any]) -> str:
    """The score's recorded confidence interval, else a binomial one for an accuracy."""
    from coordinator.evaluation.report import format_score

    for low_key, high_key in (("ci_low", "ci_high"), ("low", "high")):
        if low_key in score and high_key in score:
            low, high = float(score[low_key]), float(score[high_key])
            return f"{format_score(score['metric'], low)} – {format_score(score['metric'], high)}"
    count = int(score.get("count") or 0)
    if score.get("metric") == "accuracy" and count > 0:
        low, high = wilson(float(score["value"]) * count, count)
        return f"{100 * low:.1f} – {100 * high:.1f} % (Wilson, n={count})"
    return ""


def five_way_scores(scores: dict[str, Any]) -> list[Score]:
    """The five-way table's rows in the report's order."""
    # the evaluation modules import torch: a run page pays that once, `serve` never
    from coordinator.evaluation.five_way import SETTINGS
    from coordinator.evaluation.report import format_score

    return [
        Score(
            title, format_score(scores[key]["metric"], scores[key]["value"]), _interval(scores[key])
        )
        for key, title in SETTINGS
        if isinstance(scores.get(key), dict) and "value" in scores[key]
    ]


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "—"


def _parse_iso(text: str) -> datetime | None:
    try:
        found = datetime.fromisoformat(text)
    except ValueError:
        return None
    return found if found.tzinfo else found.replace(tzinfo=timezone.utc)


def replies(reports: Iterable[dict[str, Any]], names: dict[str, str]) -> list[Reply]:
    """The rounds log's records as replies; ``names`` maps Flower node ids to node names."""
    out = []
    for report in reports:
        reply = TrainReply.from_report(report)
        node_id = str(report.get("node-id", ""))
        if reply is not None and "partition-id" in report and not names:
            client = f"client {reply.partition_id}"
        else:
            client = names.get(node_id) or (f"node {node_id[:8]}" if node_id else "?")
        if report.get("error"):
            verdict, reason = "dropped", short_error(str(report["error"]))
        elif report.get("quarantined"):
            verdict, reason = "quarantined", short_error(str(report["quarantined"]))
        else:
            verdict, reason = "accepted", ""
        out.append(
            Reply(
                int(report.get("round", 0)),
                client,
                verdict,
                reason,
                reply.num_examples if reply else 0,
                reply.train_loss if reply else None,
                node_id,
            )
        )
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def round_seconds(records: list[RoundRecord], started: datetime | None) -> dict[int, float]:
    """Each round's wall time, from the previous round's close (the first round: from
    ``started``, when the ServerApp recorded the run) to its own. A round's own start is
    recorded with its checkpoint, at its close, so it says nothing about its length."""
    out: dict[int, float] = {}
    previous = started
    for record in sorted(records, key=lambda r: r.number):
        if record.finished_at is not None and previous is not None:
            out[record.number] = max(0.0, (record.finished_at - previous).total_seconds())
        previous = record.finished_at
    return out


def round_views(
    records: list[RoundRecord],
    folder_replies: list[Reply],
    outcomes: list[dict[str, Any]],
    started: datetime | None = None,
) -> list[RoundView]:
    """Per round: the registry's verdict and timing with the folder's replies and losses."""
    by_round: dict[int, list[Reply]] = {}
    for reply in folder_replies:
        by_round.setdefault(reply.round, []).append(reply)
    verdicts = {int(o.get("round", 0)): o for o in outcomes if isinstance(o.get("round"), int)}
    numbers = sorted(
        {r.number for r in records if r.number > 0} | {n for n in by_round if n > 0} | set(verdicts)
    )
    registry = {r.number: r for r in records}
    timing = round_seconds(records, started)
    views = []
    for number in numbers:
        record = registry.get(number)
        got = by_round.get(number, [])
        losses = {r.client: r.loss for r in got if r.verdict == "accepted" and r.loss is not None}
        verdict = verdicts.get(number, {})
        epsilon = (
            record.epsilon if record and record.epsilon is not None else verdict.get("epsilon")
        )
        views.append(
            RoundView(
                number=number,
                status=record.status if record else ("closed" if verdict else "open"),
                outcome=(record.outcome if record and record.outcome else "")
                or str(verdict.get("outcome", "")),
                seconds=timing.get(number),
                epsilon=float(epsilon) if epsilon is not None else None,
                accepted=sum(r.verdict == "accepted" for r in got),
                dropped=sum(r.verdict == "dropped" for r in got),
                quarantined=sum(r.verdict == "quarantined" for r in got),
                mean_loss=_mean([v for v in losses.values() if v is not None]),
                losses={k: v for k, v in losses.items() if v is not None},
                reasons=tuple(f"{r.client}: {r.reason}" for r in got if r.reason),
            )
        )
    return views


def _state(record: RunRecord | None, folder: RunFolder, metrics: dict[str, Any]) -> str:
    if record is not None and record.status in ("finished", "failed"):
        return record.status
    if metrics.get("scores"):
        return "finished"
    if metrics:
        return "failed"  # a failure report: the adapter never trained
    config = record.config if record else {}
    timeout = float((config.get("federation") or {}).get("round_timeout") or 0.0)
    last = record.last_activity if record else None
    if last is None:
        try:
            last = datetime.fromtimestamp(folder.path.stat().st_mtime, timezone.utc)
        except OSError:
            last = None
    quiet = timedelta(seconds=max(timeout, MIN_TIMEOUT))
    if last is not None and datetime.now(timezone.utc) - last < quiet:
        return "running"
    return "resumable" if folder.can_resume else "failed"


def _aggregation(config: dict[str, Any]) -> str:
    federation = config.get("federation") or {}
    privacy = config.get("privacy") or {}
    parts = [str(federation.get("aggregation", "fedavg"))]
    if federation.get("secure_aggregation"):
        parts.append("SecAgg+")
    if float(privacy.get("noise_multiplier") or 0.0) > 0 or float(privacy.get("epsilon") or 0) > 0:
        parts.append(f"DP (ε budget {privacy.get('epsilon')}, δ {privacy.get('delta')})")
    return " + ".join(parts)


# ---------------------------------------------------------------------------------- runs


@dataclass
class _RunFiles:
    """The run folder's records, read through ``RunFolder`` and cached by mtime."""

    cache: FileCache

    def metrics(self, folder: RunFolder) -> dict[str, Any]:
        return self.cache.get(folder.metrics_path, "metrics", folder.metrics, {})

    def reports(self, folder: RunFolder) -> list[dict[str, Any]]:
        return self.cache.get(folder.client_reports_path, "reports", folder.client_reports, [])

    def outcomes(self, folder: RunFolder) -> list[dict[str, Any]]:
        return self.cache.get(folder.outcomes_path, "outcomes", folder.outcomes, [])

    def config(self, folder: RunFolder) -> dict[str, Any]:
        def read() -> dict[str, Any]:
            try:
                return folder.config().to_dict()
            except (OffsiteError, OSError, ValueError):
                return {}

        return self.cache.get(folder.config_path, "config", read, {})


def run_view(
    key: str,
    folder: RunFolder,
    record: RunRecord | None,
    files: _RunFiles,
    names: dict[str, str],
    rounds_done: list[RoundRecord],
) -> RunView:
    metrics = files.metrics(folder)
    config = record.config if record and record.config else files.config(folder)
    got = replies(files.reports(folder), names)
    rounds = int((config.get("federation") or {}).get("rounds") or (record.rounds if record else 0))
    closed = (
        record.closed
        if record
        else len(folder.adapter_rounds()) - (1 if 0 in folder.adapter_rounds() else 0)
    )
    last = max((r.round for r in got), default=0)
    losses = [r.loss for r in got if r.round == last and r.loss is not None]
    return RunView(
        key=key,
        label=folder.name,
        path=folder.path,
        state=_state(record, folder, metrics),
        rounds=rounds,
        closed=closed,
        failed_rounds=record.failed if record else 0,
        model=Path(str((config.get("model") or {}).get("name", "?"))).name,
        data=Path(str((config.get("data") or {}).get("name", "?"))).name,
        aggregation=_aggregation(config),
        accepted=sum(r.verdict == "accepted" for r in got),
        dropped=sum(r.verdict == "dropped" for r in got),
        quarantined=sum(r.verdict == "quarantined" for r in got),
        last_loss=_mean(losses),
        last_round_seconds=timing[max(timing)]
        if (timing := round_seconds(rounds_done, record.created_at if record else None))
        else None,
        created_at=record.created_at if record else None,
    )


def file_links(folder: RunFolder) -> list[FileLink]:
    """The run's exports and PEFT adapters, newest round first."""
    links = []
    for number in reversed(folder.adapter_rounds()):
        for label, place in (
            ("merged export", folder.export_dir(number)),
            ("PEFT adapter", folder.peft_dir(number)),
        ):
            if place.is_dir():
                for path in sorted(p for p in place.rglob("*") if p.is_file()):
                    relative = path.relative_to(folder.path).as_posix()
                    links.append(FileLink(f"{label} round {number}: {path.name}", relative))
    final = folder.adapter_rounds()
    if final:
        path = folder.adapter_path(final[-1])
        links.append(
            FileLink(f"global adapter round {final[-1]}", path.relative_to(folder.path).as_posix())
        )
    if folder.report_path.is_file():
        links.append(FileLink("report.md", folder.report_path.name))
    if folder.metrics_path.is_file():
        links.append(FileLink("metrics.json", folder.metrics_path.name))
    return links


def _signature(folder: RunFolder, public_key: bytes | None) -> str:
    from emulator.bundle import check_signature

    if not folder.bundle_dir.is_dir():
        return "no bundle in the run folder"
    if public_key is None:
        return "not checked (no coordinator signing key: a simulation's bundle is unsigned)"
    try:
        check_signature(folder.bundle_dir, public_key)
    except IntegrityError as err:
        return f"INVALID: {err}"
    return "valid (the coordinator's bundle-signing key)"


def run_detail(
    view: RunView,
    folder: RunFolder,
    records: list[RoundRecord],
    files: _RunFiles,
    names: dict[str, str],
    bundle_digest: str,
    public_key: bytes | None,
) -> RunDetail:
    from coordinator.evaluation.report import margin_lines
    from emulator.build import describe_privacy

    metrics = files.metrics(folder)
    config = files.config(folder) or metrics.get("config") or {}
    rounds = round_views(
        records,
        replies(files.reports(folder), names),
        files.outcomes(folder),
        view.created_at,
    )
    clients = sorted({c for r in rounds for c in r.losses})
    scores = metrics.get("scores") or {}
    info = metrics.get("run") or {}
    privacy = info.get("privacy") or {}
    budget = float((config.get("privacy") or {}).get("epsilon") or 0.0) or None
    spent = [r.epsilon for r in rounds if r.epsilon is not None]
    loss_series = [
        Series(client, [(r.number, r.losses[client]) for r in rounds if client in r.losses])
        for client in clients
    ]
    eps_series = [
        Series("ε spent", [(r.number, r.epsilon) for r in rounds if r.epsilon is not None])
    ]
    return RunDetail(
        run=view,
        rounds=rounds,
        clients=clients,
        scores=five_way_scores(scores),
        margins=margin_lines(scores, metrics.get("training")) if scores else [],
        privacy=describe_privacy(privacy) if privacy.get("middle_tensors") else "",
        privacy_numbers=privacy,
        epsilon_budget=budget,
        epsilon_spent=spent[-1] if spent else None,
        bundle_digest=bundle_digest or str(info.get("bundle_digest", "")),
        signature=_signature(folder, public_key),
        plots=[name for name in ("five_way", "loss_per_round") if folder.plot_path(name).is_file()],
        files=file_links(folder),
        loss_svg=line_plot(loss_series, "round", "local training loss") if clients else "",
        epsilon_svg=line_plot(eps_series, "round", "ε", budget=budget) if spent else "",
        warning=str((metrics.get("training") or {}).get("warning", "")),
        config=config,
    )


# ---------------------------------------------------------------------------------- sources


def _fingerprint(raw: bytes) -> str:
    return "SHA256:" + hashlib.sha256(raw).hexdigest()[:24]


@dataclass
class CoordinatorSource:
    """A coordinator's registry, its SuperLink and its deployed runs' folders."""

    state: Path
    store: Store
    superlink: Callable[[], list[SuperLinkNode]] | None = None  # None: not serving
    app_key: str = ""  # the app-signing key id nodes pin at enrollment ("fpk_…")
    app_key_since: datetime | None = None  # nodes enrolled before it must join again
    bundle_key: bytes | None = None  # the raw Ed25519 key that signs bundles
    title: str = "coordinator"
    manageable: bool = True
    _files: _RunFiles = field(default_factory=lambda: _RunFiles(FileCache()))
    _link_cache: tuple[float, list[SuperLinkNode] | None] | None = None

    def _held(self) -> list[SuperLinkNode] | None:
        """The SuperLink's node table (None: not serving), asked at most every few seconds."""
        if self.superlink is None:
            return None
        now = time.monotonic()
        if self._link_cache is not None and now - self._link_cache[0] < LINK_SECONDS:
            return self._link_cache[1]
        try:
            held: list[SuperLinkNode] | None = self.superlink()
        except (OffsiteError, OSError):
            held = None
        self._link_cache = (now, held)
        return held

    def forget_superlink(self) -> None:
        """Ask the SuperLink again on the next read (after a revocation)."""
        self._link_cache = None

    def _names(self, nodes: list[NodeRecord], held: list[SuperLinkNode] | None) -> dict[str, str]:
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
            for reply in replies(self._files.reports(folder), names):
                if reply.verdict == "accepted":
                    per_run = examples.setdefault(reply.client, {})
                    per_run[folder.name] = per_run.get(folder.name, 0) + reply.examples
        now = datetime.now(timezone.utc)
        views = []
        for node in records:
            link = by_id.get(node.flower_node_id or "") or by_name.get(node.name)
            status = "not serving" if held is None else (link.status if link else "—")
            if link is not None and link.status == "online":
                seen = _when(now)
            elif link is not None:
                seen = _when(
                    _parse_iso(link.last_deactivated_at) or _parse_iso(link.last_activated_at)
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
        for run in runs:
            rounds = round_records(self.store, run.id) if run.closed or run.opened else []
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
    _files: _RunFiles = field(default_factory=lambda: _RunFiles(FileCache()))
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
