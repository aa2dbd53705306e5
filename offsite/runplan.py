"""The run plan: everything a ServerApp needs to drive one federated run, as a JSON file.

``offsite simulate`` writes it into the run folder and passes only its path to Flower
(``run_config["plan"]``), so Flower messages and contexts stay small (FLOWER.md pitfall 11).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunPlan:
    run_dir: str
    bundle_path: str
    bundle_digest: str
    data_dir: str  # holds client-<partition>.jsonl (simulation)
    task_kind: str
    labels: tuple[str, ...]
    template: str
    config: dict[str, Any]  # the full OffsiteConfig as a dict
    # deployment: the bundle's artifact digest on the coordinator's artifact service ("" = none)
    bundle_artifact: str = ""

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path | str) -> RunPlan:
        data = json.loads(Path(path).read_text())
        data["labels"] = tuple(data["labels"])
        return cls(**data)
