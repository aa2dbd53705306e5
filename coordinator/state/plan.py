"""The run plan: what a ServerApp needs to drive one federated run, besides its configuration.

``offsite simulate`` and ``offsite run`` write it into the run folder next to the run's
``config.toml`` and pass only its path to Flower (``run_config["plan"]``), so Flower messages and
contexts stay small: Flower copies its run config into every message context.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class RunPlan:
    run_dir: str
    bundle_path: str
    bundle_digest: str
    data_dir: str  # holds client-<partition>.jsonl (simulation)
    task_kind: str
    labels: tuple[str, ...]
    template: str
    # deployment: the bundle's artifact digest on the coordinator's artifact service ("" = none)
    bundle_artifact: str = ""
    # the registry that records the run's rounds: "" = the run folder's own (simulation), else
    # the coordinator's (its state folder or database URL), so a coordinator has one registry
    registry: str = ""

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path | str) -> RunPlan:
        data = json.loads(Path(path).read_text())
        data["labels"] = tuple(data["labels"])
        known = {f.name for f in fields(cls)}
        # plans written before the configuration was stored once also held it ("config")
        return cls(**{k: v for k, v in data.items() if k in known})
