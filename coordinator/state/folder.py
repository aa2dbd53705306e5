"""The run folder: one federated run's files, and the only code that knows their layout.

A run folder holds the run's configuration (``config.toml``, stored once), its plan for the
ServerApp (``plan.json``), the emulator bundle, the simulated clients' data, one global adapter
per round, the client reports and round verdicts the ServerApp records, the report, exports and
PEFT adapters. Every other module asks a ``RunFolder`` for a path or a record instead of joining
file names itself, so the layout can change in one place.

Round progress that must survive a crash (which rounds closed, each checkpoint's digest) lives
in the registry (``coordinator.state.ledger``); the JSON logs here are the human-readable detail.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.state.plan import RunPlan
from emulator.bundle import Bundle, verify_bundle
from offsite.config import OffsiteConfig, load_config
from offsite.errors import DataError
from offsite.host.files import write_atomic

CONFIG = "config.toml"
PLAN = "plan.json"
CLIENT_REPORTS = "rounds.json"  # one record per client reply
OUTCOMES = "outcomes.json"  # one verdict per round
METRICS = "metrics.json"
REPORT = "report.md"
FLOWER_LOG = "flower.log"
REGISTRY = "registry"  # the run's own registry (simulation); deployments use the coordinator's


@dataclass(frozen=True)
class RunFolder:
    path: Path

    # --- creating and opening -----------------------------------------------------------------

    @classmethod
    def new(cls, config: OffsiteConfig) -> RunFolder:
        """A fresh folder ``<output_dir>/<time>-<model>-<data>[-n]`` for a run of ``config``."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        model = Path(config.model.name).name.replace("/", "-")
        data = Path(config.data.name).stem
        base = Path(config.output_dir) / f"{stamp}-{model}-{data}"
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        path.mkdir(parents=True)
        return cls(path.resolve())

    @classmethod
    def at(cls, path: Path | str) -> RunFolder:
        """The run folder at ``path`` (created if missing), for a new run there."""
        folder = Path(path).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        return cls(folder)

    @classmethod
    def existing(cls, path: Path | str, hint: str = "pass a folder under runs/") -> RunFolder:
        """An existing run folder; a one-line ``DataError`` when ``path`` is not one."""
        folder = cls(Path(path).resolve())
        if not folder.config_path.is_file():
            raise DataError(f"{path} is not a run folder (no {CONFIG}); {hint}")
        return folder

    @property
    def name(self) -> str:
        return self.path.name

    # --- configuration and plan ---------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    def write_config(self, config: OffsiteConfig) -> None:
        self.config_path.write_text(config.to_toml())

    def config(self) -> OffsiteConfig:
        """The run's configuration, validated (the one copy: ``config.toml``)."""
        return load_config(self.config_path)

    @property
    def plan_path(self) -> Path:
        return self.path / PLAN

    @property
    def can_resume(self) -> bool:
        return self.plan_path.is_file() and self.config_path.is_file()

    def save_plan(self, plan: RunPlan) -> Path:
        plan.save(self.plan_path)
        return self.plan_path

    def plan(self) -> RunPlan:
        return RunPlan.load(self.plan_path)

    # --- inputs -------------------------------------------------------------------------------

    @property
    def bundle_dir(self) -> Path:
        return self.path / "bundle"

    def bundle(self) -> Bundle:
        """The run's emulator bundle, verified (files, digests) and, once the run has a plan,
        checked to be the very bundle the plan recorded."""
        plan = self.plan() if self.plan_path.is_file() else None
        if plan is None:
            return verify_bundle(self.bundle_dir)
        return verify_bundle(plan.bundle_path, expected_digest=plan.bundle_digest)

    @property
    def data_dir(self) -> Path:
        """Simulated clients' shares, ``client-<partition>.jsonl``."""
        return self.path / "data"

    def client_data(self, partition: int) -> Path:
        return self.data_dir / f"client-{partition}.jsonl"

    @property
    def registry(self) -> Path:
        return self.path / REGISTRY

    # --- rounds -------------------------------------------------------------------------------

    def adapter_path(self, round_: int) -> Path:
        """The global adapter after ``round_`` (0 = the initial one)."""
        return self.path / "adapters" / f"round-{round_}.safetensors"

    def adapter_rounds(self) -> list[int]:
        """Rounds that left a global adapter, ascending."""
        return sorted(
            int(p.stem.split("-")[1])
            for p in (self.path / "adapters").glob("round-*.safetensors")
            if p.stem.split("-")[1].isdigit()
        )

    @property
    def client_reports_path(self) -> Path:
        return self.path / CLIENT_REPORTS

    @property
    def outcomes_path(self) -> Path:
        return self.path / OUTCOMES

    def client_reports(self) -> list[dict[str, Any]]:
        """What every client reported, one record per reply (``round`` is the run's round)."""
        return _records(self.client_reports_path)

    def outcomes(self) -> list[dict[str, Any]]:
        """One verdict per round (round 0 = the initial adapter)."""
        return _records(self.outcomes_path)

    def write_client_reports(self, reports: list[dict[str, Any]]) -> None:
        write_atomic(self.client_reports_path, json.dumps(reports, indent=1))

    def write_outcomes(self, outcomes: list[dict[str, Any]]) -> None:
        write_atomic(self.outcomes_path, json.dumps(outcomes, indent=1))

    # --- outputs ------------------------------------------------------------------------------

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    def metrics(self) -> dict[str, Any]:
        """The finished run's ``metrics.json``; empty when the run has not reported."""
        data = _read_json(self.metrics_path)
        return data if isinstance(data, dict) else {}

    @property
    def report_path(self) -> Path:
        return self.path / REPORT

    def plot_path(self, name: str) -> Path:
        return self.path / f"{name}.png"

    @property
    def flower_log(self) -> Path:
        return self.path / FLOWER_LOG

    def export_dir(self, round_: int) -> Path:
        return self.path / "export" / f"round-{round_}"

    def peft_dir(self, round_: int) -> Path:
        """The PEFT adapter pushed to a serving endpoint after ``round_``."""
        return self.path / "peft" / f"round-{round_}"

    @property
    def lm_eval_dir(self) -> Path:
        return self.path / "lm-eval"


def _records(path: Path) -> list[dict[str, Any]]:
    """The JSON list of records at ``path``; empty when missing or unreadable (records are
    written atomically, so a killed run leaves the previous round's file, never half of one)."""
    data = _read_json(path)
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []


def _read_json(path: Path) -> Any:
    """The JSON value in ``path`` (any shape: callers check it), or None when missing or not
    JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
