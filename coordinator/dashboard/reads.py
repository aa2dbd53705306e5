"""What the dashboard shows, read from the registry (``coordinator.store``) and each run's folder
(``coordinator.state.RunFolder``, the one owner of run files): plain records, no HTML.

Two sources feed the same pages (``sources``): a coordinator's registry and a folder of
simulations; both build their records with the functions here.

A run's state is derived, because the registry records rounds, not the process: a run whose
report has scores is *finished*; one whose report says it trained nothing is *failed*; one with
activity in the registry within its round timeout is *running*; otherwise it stopped mid-way,
*resumable* when its folder holds a plan (``offsite run --resume``), else *failed*.

Run files are re-read only when they change (cached by size and mtime), so a page over 100 runs
reads a few hundred ``stat`` results, not a few hundred JSON files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol, TypeVar

from coordinator.dashboard.plots import Series, line_plot
from coordinator.state.folder import RunFolder
from coordinator.state.health import short_error
from coordinator.store.overview import RoundRecord, RunRecord
from offsite.config import OffsiteConfig, config_from_dict, lora_aggregation_mode
from offsite.errors import ConfigError, IntegrityError, OffsiteError
from offsite.wire.messages import TrainReply

T = TypeVar("T")
STATES = ("running", "finished", "failed", "resumable")
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
    partition: int | None = None  # simulation: the client's data partition


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


def when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "—"


def parse_iso(text: str) -> datetime | None:
    try:
        found = datetime.fromisoformat(text)
    except ValueError:
        return None
    return found if found.tzinfo else found.replace(tzinfo=timezone.utc)


def replies(reports: Iterable[dict[str, Any]], names: dict[str, str]) -> list[Reply]:
    """The rounds log's records as replies; ``names`` maps Flower node ids to node names."""
    return name_replies(parse_replies(reports), names)


def parse_replies(reports: Iterable[dict[str, Any]]) -> list[Reply]:
    """The rounds log's records as replies, clients not yet named (see ``name_replies``)."""
    out = []
    for report in reports:
        reply = TrainReply.from_report(report)
        if report.get("error"):
            verdict, reason = "dropped", short_error(str(report["error"]))
        elif report.get("quarantined"):
            verdict, reason = "quarantined", short_error(str(report["quarantined"]))
        else:
            verdict, reason = "accepted", ""
        out.append(
            Reply(
                int(report.get("round", 0)),
                "",
                verdict,
                reason,
                reply.num_examples if reply else 0,
                reply.train_loss if reply else None,
                str(report.get("node-id", "")),
                reply.partition_id if reply is not None else None,
            )
        )
    return out


def name_replies(parsed: list[Reply], names: dict[str, str]) -> list[Reply]:
    """Replies with their client named: the node's name in a deployment (``names``: Flower
    node id -> name), the partition in a simulation, else the node id."""
    out = []
    for reply in parsed:
        node_id = reply.node_id
        if reply.partition is not None and not names:
            client = f"client {reply.partition}"
        else:
            client = names.get(node_id) or (f"node {node_id[:8]}" if node_id else "?")
        out.append(dataclasses.replace(reply, client=client))
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
    typed = _typed(record.config if record else {})
    timeout = typed.federation.round_timeout if typed else 0.0
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


def _typed(config: dict[str, Any]) -> OffsiteConfig | None:
    """A run's saved config read through ``offsite.config`` (its one owner: keys, defaults,
    validation); None when it no longer validates (a run from an older Offsite)."""
    return _typed_from_json(json.dumps(config, sort_keys=True, default=str))


@functools.lru_cache(maxsize=4096)
def _typed_from_json(text: str) -> OffsiteConfig | None:
    try:
        return config_from_dict(json.loads(text))
    except (ConfigError, TypeError, ValueError):
        return None


def _aggregation(config: dict[str, Any]) -> str:
    """Strategy, rule, LoRA aggregation mode and privacy of a run, e.g.
    'fedadam · trimmed-mean · merge-exact + SecAgg + DP (ε 8, δ 1e-05)'."""
    typed = _typed(config)
    if typed is None:
        return "? (config from an older Offsite)"
    federation, privacy = typed.federation, typed.privacy
    parts = [federation.strategy, federation.aggregation, lora_aggregation_mode(typed)]
    text = " · ".join(parts)
    if federation.secure_aggregation:
        text += " + SecAgg"
    if privacy.noise_multiplier > 0 or privacy.epsilon > 0:
        text += f" + DP (ε budget {privacy.epsilon:g}, δ {privacy.delta:g})"
    return text


# ---------------------------------------------------------------------------------- runs


@dataclass
class RunFiles:
    """The run folder's records, read through ``RunFolder`` and cached by mtime."""

    cache: FileCache

    def metrics(self, folder: RunFolder) -> dict[str, Any]:
        return self.cache.get(folder.metrics_path, "metrics", folder.metrics, {})

    def parsed(self, folder: RunFolder) -> list[Reply]:
        """The run's replies, clients unnamed, parsed once per change of its rounds log."""

        def read() -> list[Reply]:
            return parse_replies(folder.client_reports())

        return self.cache.get(folder.client_reports_path, "replies", read, [])

    def replies(self, folder: RunFolder, names: dict[str, str]) -> list[Reply]:
        return name_replies(self.parsed(folder), names)

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
    files: RunFiles,
    names: dict[str, str],
    rounds_done: list[RoundRecord],
) -> RunView:
    metrics = files.metrics(folder)
    config = record.config if record and record.config else files.config(folder)
    got = files.parsed(folder)  # counts and losses: no names needed
    typed = _typed(config)
    rounds = typed.federation.rounds if typed else (record.rounds if record else 0)
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
        model=Path(typed.model.name).name if typed else "?",
        data=Path(typed.data.name).name if typed else "?",
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
        links.append(FileLink(folder.report_path.name, folder.report_path.name))
    if folder.metrics_path.is_file():
        links.append(FileLink(folder.metrics_path.name, folder.metrics_path.name))
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
    files: RunFiles,
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
        files.replies(folder, names),
        files.outcomes(folder),
        view.created_at,
    )
    clients = sorted({c for r in rounds for c in r.losses})
    scores = metrics.get("scores") or {}
    info = metrics.get("run") or {}
    privacy = info.get("privacy") or {}
    typed = _typed(config)
    budget = (typed.privacy.epsilon or None) if typed else None
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
