"""A real deployment on 127.0.0.1: coordinator and two data-owner nodes as separate processes.

init → two one-time tokens → two joins (client keys made on the node, CA pinned) → `coordinator
serve` (enrollment TLS, artifacts mutual TLS, Flower SuperLink with TLS and SuperNode
authentication) → two `client start` SuperNodes on their own data → `offsite run` for 2 rounds
on a tiny model: the nodes download and verify the signed bundle, train, and the coordinator
stores the result. Then a revoked node is unregistered from the SuperLink.
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
from pathlib import Path

import pytest

from offsite.data import Example, write_jsonl
from tests.conftest import LABELS, tiny_texts

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, process: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"process exited with {process.returncode}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"nothing listens on port {port}")


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


@pytest.fixture()
def processes(tmp_path: Path) -> Iterator[Processes]:
    env = dict(os.environ)
    env.update(
        OFFSITE_HOME=str(tmp_path / "home"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        HF_HUB_OFFLINE="1",
        PYTHONWARNINGS="ignore",
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    running = Processes(env, logs)
    try:
        yield running
    finally:
        running.stop_all()


def test_coordinator_and_two_nodes_federate_over_mtls_and_node_auth(
    tiny_llama_dir: Path, tmp_path: Path, processes: Processes
) -> None:
    state = tmp_path / "coordinator"
    enroll, artifacts, flower = _free_port(), _free_port(), _free_port()
    fingerprint = processes.offsite(
        "coordinator", "init", "--state", str(state), "--host", "127.0.0.1"
    )
    ca = fingerprint.split("CA fingerprint:")[1].strip()

    # the coordinator's held-out set and each node's own data
    write_jsonl(
        [Example(t, label=lab) for lab in LABELS for t in tiny_texts(lab, 8, seed=9)],
        tmp_path / "eval.jsonl",
    )
    for index, name in enumerate(("site-a", "site-b")):
        write_jsonl(
            [Example(t, label=lab) for lab in LABELS for t in tiny_texts(lab, 12, seed=index)],
            tmp_path / f"{name}.jsonl",
        )

    server = processes.start(
        "coordinator",
        "coordinator",
        "serve",
        "--state",
        str(state),
        "--enroll",
        f"127.0.0.1:{enroll}",
        "--artifacts",
        f"127.0.0.1:{artifacts}",
        "--flower",
        f"127.0.0.1:{flower}",
    )
    _wait_port(enroll, server)
    _wait_port(flower, server)

    for name in ("site-a", "site-b"):
        token = processes.offsite("coordinator", "token", "--state", str(state)).strip()
        node = tmp_path / name
        processes.offsite(
            "client",
            "join",
            "--coordinator",
            f"127.0.0.1:{enroll}",
            "--token",
            token,
            "--ca-fingerprint",
            ca,
            "--name",
            name,
            "--state",
            str(node),
        )
        details = json.loads((node / "node.json").read_text())
        assert details["superlink"] == f"127.0.0.1:{flower}"
        assert oct((node / "flower.key").stat().st_mode & 0o777) == "0o600"
        processes.start(
            name,
            "client",
            "start",
            "--state",
            str(node),
            "--data",
            str(tmp_path / f"{name}.jsonl"),
            "--port",
            str(_free_port()),
        )

    runs = tmp_path / "runs"
    output = processes.offsite(
        "run",
        "--state",
        str(state),
        f"model.name='{tiny_llama_dir}'",
        f"data.name='{tmp_path / 'eval.jsonl'}'",
        "data.eval_size=10",
        "data.max_length=48",
        "emulator.bottom=1",
        "emulator.top=1",
        "emulator.keep=2",
        "federation.num_clients=2",
        "federation.rounds=2",
        "federation.round_timeout=300",
        "train.local_steps=2",
        "train.batch_size=4",
        "train.precision='fp32'",
        f"output_dir='{runs}'",
        timeout=900,
    )
    (run,) = list(runs.iterdir())
    assert (run / "adapters" / "round-2.safetensors").is_file(), output
    assert (run / "report.md").is_file()
    rounds = json.loads((run / "rounds.json").read_text())
    per_round = {r["round"]: {int(r["partition-id"]) for r in rounds} for r in rounds}
    assert sorted(per_round) == [1, 2]
    assert all(len(nodes) == 2 for nodes in per_round.values()), per_round
    metrics = json.loads((run / "metrics.json").read_text())
    assert "federated training (Flower deployment)" in metrics["timings"]
    outcomes = json.loads((run / "outcomes.json").read_text())
    assert [o["round"] for o in outcomes if o["round"] > 0] == [1, 2]
    # each node fetched and verified the signed bundle into its own cache
    digest = metrics["run"]["bundle_digest"]
    for name in ("site-a", "site-b"):
        assert (tmp_path / name / "cache" / "bundles" / digest / "manifest.sig").is_file()

    # revocation reaches the SuperLink: the node's Flower key is unregistered within seconds
    from coordinator.flower_link import FlowerLink
    from coordinator.store import open_store

    link = FlowerLink.of_state(state)
    before = [n["status"] for n in link.nodes()]
    assert before.count("online") == 2, before
    processes.offsite("coordinator", "revoke", "site-b", "--state", str(state))

    deadline = time.monotonic() + 60
    pending = None
    while time.monotonic() < deadline:
        pending = {k.name for k in open_store(state).flower_out_of_sync()}
        if not pending:
            break
        time.sleep(1.0)
    assert pending == set()
    after = [n["status"] for n in link.nodes()]
    assert after.count("online") + after.count("registered") == 1, after
