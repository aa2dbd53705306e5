"""Federate over a real deployment: the coordinator's SuperLink and its enrolled SuperNodes.

``offsite run`` prepares the run exactly as ``offsite simulate`` does (held-out split, emulator
bundle, run plan), then instead of the simulation engine it

1. signs the bundle and publishes it on the artifact service (nodes download it on first use,
   over mutual TLS, verifying signature and digests before loading anything);
2. builds the Flower app (this installation's ``coordinator.federation.server_app`` /
   ``client.flower_app``), signs it with the coordinator's app key and files it in the
   coordinator's app registry, then starts it on the SuperLink with ``flwr run @offsite/…``
   (only ``plan`` travels as run config) and streams its log: nodes run it because its
   signature verifies against the key they pinned at enrollment;
3. follows the rounds the ServerApp closes in the coordinator's registry (the run's rounds are
   recorded there, not in a second registry in the run folder), then evaluates and reports
   from the run folder the ServerApp wrote, as a simulation does.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator.service.flower_link import CONNECTION, FlowerLink, FlowerLinkError
from coordinator.state.folder import RunFolder
from offsite.host.processes import flower_env

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Published:
    """A bundle offered on the artifact service."""

    artifact: str  # digest of the archive nodes download
    bundle_digest: str  # the bundle's own digest (its manifest)
    size: int  # bytes


@dataclass(frozen=True)
class Deployment:
    """The coordinator state folder (keys, registry, artifacts, SuperLink) a run goes through."""

    state: Path
    database: str | None = None

    def publish(self, bundle_dir: Path) -> Published:
        """Sign ``bundle_dir`` and offer it on the artifact service."""
        from coordinator.service.grpc_server import state_paths
        from coordinator.service.pki import signing_key
        from coordinator.store import open_store
        from emulator.bundle import sign_bundle, verify_bundle

        pki, files = state_paths(self.state)
        verified = verify_bundle(bundle_dir)
        sign_bundle(bundle_dir, signing_key(pki))
        artifact, size = files.add_bundle(bundle_dir)
        store = open_store(self.registry)
        store.put_artifact(artifact, "bundle", size, files.path(artifact))
        return Published(artifact, verified.digest, size)

    def signed_app(self) -> str:
        """Build, sign and file the run's Flower app; the app spec ``flwr run`` takes."""
        from coordinator.service.app_registry import build_and_file_app
        from coordinator.service.grpc_server import state_paths

        pki, _ = state_paths(self.state)
        return build_and_file_app(self.state, pki).spec

    @property
    def registry(self) -> str:
        """The coordinator's registry (database URL or state folder): deployed runs record
        their rounds there, beside its nodes and artifacts."""
        return self.database or str(self.state)

    def federate(self, folder: RunFolder, verbose: bool = False) -> None:
        """Run the folder's plan on the SuperLink; a progress bar follows the rounds the
        ServerApp closes in the coordinator's registry, Flower's own log goes to the folder's
        ``flower.log`` (and to the terminal with ``verbose``)."""
        from tqdm.auto import tqdm

        from coordinator.state.ledger import run_registry

        federation = folder.config().federation
        total = federation.rounds
        store, name = run_registry(folder, folder.plan())
        link = FlowerLink.of_state(self.state)
        _wait_for_nodes(link, federation.num_clients, federation.node_wait)
        command = [
            str(Path(sys.executable).parent / "flwr"),
            "run",
            self.signed_app(),
            CONNECTION,
            "--run-config",
            f'plan="{folder.plan_path}"',
            "--stream",
        ]
        log_path = folder.flower_log

        def finished_rounds() -> int:
            run_id = store.run_id(name)
            return store.last_closed_round(run_id) if run_id is not None else 0

        with (
            log_path.open("a") as log,
            tqdm(total=total, desc=f"rounds on {link.address}", unit="round") as bar,
        ):
            process = subprocess.Popen(
                command,
                env=flower_env(link.home),
                stdout=None if verbose else log,
                stderr=subprocess.STDOUT,
            )
            while process.poll() is None:
                time.sleep(1.0)
                bar.update(finished_rounds() - bar.n)
            bar.update(finished_rounds() - bar.n)
        output = log_path.read_text(errors="replace")
        if process.returncode != 0 or "ServerApp raised an exception" in output:
            raise FlowerLinkError(
                f"the run on the SuperLink at {link.address} failed (exit {process.returncode}); "
                f"Flower's log is {log_path}:\n" + "\n".join(output.splitlines()[-15:])
            )


def _wait_for_nodes(link: FlowerLink, count: int, seconds: float) -> None:
    """Hold the run until ``count`` nodes are connected to the SuperLink, with a bar while
    waiting. Flower would start the first round on nodes its restarted SuperLink still counts
    online from before, and they fail it "Node Unavailable" (seen resuming after a crash)."""
    from tqdm.auto import tqdm

    if not link.started_at:
        log.warning(
            "the SuperLink's start time is not on record (an older `offsite coordinator serve` "
            "started it): nodes Flower still counts online may not be connected; restart serve"
        )
    bar: tqdm[None] | None = None

    def waiting(seen: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=count, desc=f"nodes connected to {link.address}", unit="node")
        bar.update(seen - bar.n)

    try:
        link.wait_for_nodes(count, seconds, waiting)
        if bar is not None:
            bar.update(count - bar.n)
    finally:
        if bar is not None:
            bar.close()
