"""A real deployment on 127.0.0.1: coordinator and two data-owner nodes as separate processes.

init → two one-time tokens → two joins (client keys made on the node, CA pinned) → `coordinator
serve` (enrollment TLS, artifacts mutual TLS, Flower SuperLink with TLS and SuperNode
authentication) → two `client start` SuperNodes on their own data → `offsite run` for 2 rounds
on a tiny model: the nodes download and verify the signed bundle, train, and the coordinator
stores the result. SIGKILL of the whole coordinator mid-run, restart, `offsite run --resume`:
the run completes and equals an uninterrupted one. A revoked node is unregistered from the
SuperLink.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from offsite.data import Example, write_jsonl
from offsite.processes import wait_for_port
from tests.conftest import LABELS, tiny_texts

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.running = env, logs, []  # type: ignore[var-annotated]

    def offsite(self, *args: str, timeout: float = 120.0) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "offsite.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, f"offsite {' '.join(args)}:\n{result.stdout}{result.stderr}"
        return result.stdout

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", "offsite.cli", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.running.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.running):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.running:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


@dataclass
class Deployment:
    root: Path
    state: Path
    model: Path
    processes: Processes
    enroll: int
    artifacts: int
    flower: int
    ca: str
    server: subprocess.Popen | None = None

    def serve(self) -> None:
        self.server = self.processes.start(
            "coordinator",
            "coordinator",
            "serve",
            "--state",
            str(self.state),
            "--enroll",
            f"127.0.0.1:{self.enroll}",
            "--artifacts",
            f"127.0.0.1:{self.artifacts}",
            "--flower",
            f"127.0.0.1:{self.flower}",
        )
        wait_for_port(f"127.0.0.1:{self.enroll}", 90.0, self.server)
        wait_for_port(f"127.0.0.1:{self.flower}", 90.0, self.server)

    def join_and_start(self, name: str, seed: int) -> Path:
        data = self.root / f"{name}.jsonl"
        write_jsonl(
            [Example(t, label=lab) for lab in LABELS for t in tiny_texts(lab, 12, seed=seed)], data
        )
        token = self.processes.offsite("coordinator", "token", "--state", str(self.state)).strip()
        node = self.root / name
        self.processes.offsite(
            "client",
            "join",
            "--coordinator",
            f"127.0.0.1:{self.enroll}",
            "--token",
            token,
            "--ca-fingerprint",
            self.ca,
            "--name",
            name,
            "--state",
            str(node),
        )
        self.processes.start(
            name,
            "client",
            "start",
            "--state",
            str(node),
            "--data",
            str(data),
            "--port",
            str(_free_port()),
        )
        return node

    def run_args(self, rounds: int, run_dir: Path) -> list[str]:
        return [
            "run",
            "--state",
            str(self.state),
            "--run-dir",
            str(run_dir),
            f"model.name='{self.model}'",
            f"data.name='{self.root / 'eval.jsonl'}'",
            "data.eval_size=10",
            "data.max_length=48",
            "emulator.bottom=1",
            "emulator.top=1",
            "emulator.keep=2",
            "federation.num_clients=2",
            f"federation.rounds={rounds}",
            "federation.round_timeout=300",
            "train.local_steps=2",
            "train.batch_size=4",
            "train.precision='fp32'",
        ]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Iterator[Deployment]:  # type: ignore[no-untyped-def]
    """init → serve → two one-time tokens → two joins → two SuperNodes on their own data."""
    from tests.conftest import tiny_model

    root = tmp_path_factory.mktemp("deployment")
    model = root / "tiny-llama"
    tiny_model("llama").save_pretrained(model)
    tokenizer.save_pretrained(model)
    write_jsonl(
        [Example(t, label=lab) for lab in LABELS for t in tiny_texts(lab, 8, seed=9)],
        root / "eval.jsonl",
    )
    env = dict(os.environ)
    env.update(
        OFFSITE_HOME=str(root / "home"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        HF_HUB_OFFLINE="1",
        PYTHONWARNINGS="ignore",
    )
    (root / "logs").mkdir()
    processes = Processes(env, root / "logs")
    state = root / "coordinator"
    try:
        printed = processes.offsite(
            "coordinator", "init", "--state", str(state), "--host", "127.0.0.1"
        )
        ca = printed.split("CA fingerprint:")[1].strip()
        found = Deployment(
            root, state, model, processes, _free_port(), _free_port(), _free_port(), ca
        )
        found.serve()
        for index, name in enumerate(("site-a", "site-b")):
            found.join_and_start(name, seed=index)
        yield found
    finally:
        processes.stop_all()


def _adapter(run: Path, round_number: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapters" / f"round-{round_number}.safetensors"))


def test_coordinator_and_two_nodes_federate_over_mtls_and_node_auth(
    deployment: Deployment,
) -> None:
    run = deployment.root / "runs" / "first"
    output = deployment.processes.offsite(*deployment.run_args(2, run), timeout=900)
    assert (run / "adapters" / "round-2.safetensors").is_file(), output
    assert (run / "report.md").is_file()
    assert (run / "flower.log").read_text().strip()  # Flower's own log, kept with the run
    rounds = json.loads((run / "rounds.json").read_text())
    per_round = {r["round"]: {int(r["partition-id"]) for r in rounds} for r in rounds}
    assert sorted(per_round) == [1, 2]
    assert all(len(nodes) == 2 for nodes in per_round.values()), per_round
    metrics = json.loads((run / "metrics.json").read_text())
    assert "federated training (Flower deployment)" in metrics["timings"]
    outcomes = json.loads((run / "outcomes.json").read_text())
    assert [o["round"] for o in outcomes if o["round"] > 0] == [1, 2]
    assert not (run / "data").exists(), "a deployment run must not hold client data"
    # each node fetched and verified the signed bundle into its own cache
    digest = metrics["run"]["bundle_digest"]
    for name in ("site-a", "site-b"):
        node = deployment.root / name
        assert (node / "cache" / "bundles" / digest / "manifest.sig").is_file()
        details = json.loads((node / "node.json").read_text())
        assert details["superlink"] == f"127.0.0.1:{deployment.flower}"
        assert oct((node / "flower.key").stat().st_mode & 0o777) == "0o600"


def test_each_node_supernode_allocates_with_jemalloc(deployment: Deployment) -> None:
    """`offsite client start` preloads jemalloc (the ClientApps inherit the SuperNode's env)."""
    import psutil

    from offsite.allocator import active_allocator

    def command(child: psutil.Process) -> list[str]:
        try:
            return child.cmdline()
        except psutil.Error:  # a ClientApp that finished (zombie until reaped)
            return []

    supernodes = [
        child
        for process in deployment.processes.running
        if process.poll() is None
        for child in psutil.Process(process.pid).children(recursive=True)
        if any("flower-supernode" in part for part in command(child))
    ]
    assert len(supernodes) == 2, [c.cmdline() for c in supernodes]
    assert [active_allocator(c.pid) for c in supernodes] == ["jemalloc", "jemalloc"]
    assert all("libjemalloc" in c.environ().get("LD_PRELOAD", "") for c in supernodes)


def test_a_killed_coordinator_resumes_the_deployed_run_and_matches_an_uninterrupted_one(
    deployment: Deployment,
) -> None:
    reference = deployment.root / "runs" / "reference"
    deployment.processes.offsite(*deployment.run_args(3, reference), timeout=900)

    killed = deployment.root / "runs" / "killed"
    runner = deployment.processes.start("killed-run", *deployment.run_args(3, killed))
    marker = killed / "adapters" / "round-2.safetensors"
    deadline = time.monotonic() + 600
    while not marker.is_file() and time.monotonic() < deadline and runner.poll() is None:
        time.sleep(0.2)
    assert marker.is_file(), "round 2 never finished"
    time.sleep(0.5)
    assert deployment.server is not None
    os.killpg(deployment.server.pid, signal.SIGKILL)  # serve, SuperLink, SuperExec, ServerApp
    runner.wait(timeout=120)
    assert not (killed / "report.md").exists(), "the run finished before it could be killed"

    deployment.serve()  # same state folder and ports; the SuperNodes reconnect
    deployment.processes.offsite(
        "run", "--state", str(deployment.state), "--resume", str(killed), timeout=900
    )
    final, expected = _adapter(killed, 3), _adapter(reference, 3)
    assert final.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=0, atol=1e-6)
    outcomes = json.loads((killed / "outcomes.json").read_text())
    assert [o["round"] for o in outcomes if o["round"] > 0] == [1, 2, 3]


def test_a_revoked_node_is_unregistered_from_the_superlink(deployment: Deployment) -> None:
    from coordinator.flower_link import FlowerLink
    from coordinator.store import open_store

    deployment.join_and_start("site-c", seed=5)
    link = FlowerLink.of_state(deployment.state)

    def statuses() -> dict[str, str]:
        return {str(n["node-id"]): str(n["status"]) for n in link.nodes()}

    deadline = time.monotonic() + 60
    while list(statuses().values()).count("online") < 3 and time.monotonic() < deadline:
        time.sleep(1.0)
    assert list(statuses().values()).count("online") == 3, statuses()
    deployment.processes.offsite(
        "coordinator", "revoke", "site-c", "--state", str(deployment.state)
    )
    deadline = time.monotonic() + 60
    while open_store(deployment.state).flower_out_of_sync() and time.monotonic() < deadline:
        time.sleep(1.0)
    assert open_store(deployment.state).flower_out_of_sync() == []
    after = statuses()
    assert list(after.values()).count("online") == 2, after
