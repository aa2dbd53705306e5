"""The run's durable round ledger: which rounds closed, and the checkpoint each one left.

Backed by the registry (``coordinator.store``, SQLite in ``<run>/registry``). A round counts as
complete only once its adapter file is written (atomically) *and* the registry commit recording
its digest has returned, so a coordinator killed at any point resumes from a round whose
checkpoint is intact: ``offsite simulate --resume RUN``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from coordinator.adapters import load_adapter
from coordinator.store import Store, open_store
from emulator.digest import file_sha256
from offsite.errors import IntegrityError
from offsite.runplan import RunPlan


@dataclass
class RoundLedger:
    store: Store
    run_id: int
    run_dir: Path

    @classmethod
    def open(cls, run_dir: Path, plan: RunPlan, rounds: int) -> RoundLedger:
        store = open_store(run_dir / "registry")
        name = Path(plan.run_dir).name
        run_id = store.run_id(name) or store.create_run(
            name, plan.config, plan.bundle_digest, rounds
        )
        return cls(store, run_id, run_dir)

    @property
    def completed(self) -> int:
        return self.store.last_closed_round(self.run_id)

    def close(self, number: int, adapter: Path, outcome: str, epsilon: float | None) -> None:
        digest = file_sha256(adapter)
        self.store.put_artifact(digest, "adapter", adapter.stat().st_size, adapter)
        round_id = self.store.open_round(self.run_id, number)
        if self.store.checkpoint(self.run_id, number) is None:
            self.store.add_checkpoint(self.run_id, number, digest)
        self.store.close_round(round_id, outcome, digest, epsilon)

    def checkpoint_state(self, number: int) -> dict[str, torch.Tensor]:
        """The global adapter after round ``number``, checked against its recorded digest."""
        digest = self.store.checkpoint(self.run_id, number)
        path = self.run_dir / "adapters" / f"round-{number}.safetensors"
        if digest is None or not path.is_file() or file_sha256(path) != digest:
            raise IntegrityError(
                f"the checkpoint of round {number} ({path}) is missing or does not match the "
                "registry; the run cannot resume from it"
            )
        return load_adapter(path)
