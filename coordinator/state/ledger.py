"""The run's durable round ledger: which rounds closed, and the checkpoint each one left.

Backed by a registry (``coordinator.store``): the run folder's own SQLite file for a simulation,
the coordinator's registry for a deployed run (one registry per coordinator). A round counts as
complete only once its adapter file is written (atomically) *and* the registry commit recording
its digest has returned, so a coordinator killed at any point resumes from a round whose
checkpoint is intact: ``offsite simulate --resume RUN``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from coordinator.state.adapters import load_adapter
from coordinator.state.folder import RunFolder
from coordinator.state.plan import RunPlan
from coordinator.store import Store, open_store
from emulator.digest import file_sha256
from offsite.config import OffsiteConfig
from offsite.errors import IntegrityError


def run_registry(folder: RunFolder, plan: RunPlan) -> tuple[Store, str]:
    """The registry recording ``folder``'s rounds and the run's name in it: the folder name in
    the run's own registry, the folder's full path in a coordinator's (runs from different
    output folders may share a name)."""
    if plan.registry:
        name = str(folder.path)
        if len(name) > 200:  # the registry's run names hold 200 characters
            name = f"{folder.name[:100]}-{hashlib.sha256(name.encode()).hexdigest()[:32]}"
        return open_store(plan.registry), name
    return open_store(folder.registry), folder.name


@dataclass
class RoundLedger:
    store: Store
    run_id: int
    folder: RunFolder

    @classmethod
    def open(cls, folder: RunFolder, plan: RunPlan, config: OffsiteConfig) -> RoundLedger:
        store, name = run_registry(folder, plan)
        run_id = store.run_id(name) or store.create_run(
            name, config.to_dict(), plan.bundle_digest, config.federation.rounds
        )
        return cls(store, run_id, folder)

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
        path = self.folder.adapter_path(number)
        if digest is None or not path.is_file() or file_sha256(path) != digest:
            raise IntegrityError(
                f"the checkpoint of round {number} ({path}) is missing or does not match the "
                "registry; the run cannot resume from it"
            )
        return load_adapter(path)
