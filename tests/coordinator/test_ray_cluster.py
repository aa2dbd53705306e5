"""A simulation on an existing two-node Ray cluster (``federation.ray_address``), on loopback.

The cluster is ours alone: a head and a second node started with ``ray start --block`` in their
own sessions, on free ports and in a private temp dir (so ``ray.init()`` elsewhere on this
machine never finds it), and stopped by process tree — never ``ray stop``, which would stop
every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from offsite.config import load_config
from offsite.data import Example, write_jsonl
from offsite.host.processes import stop_tree
from tests.conftest import LABELS, tiny_bundle, tiny_texts

pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _node_flags(temp_dir: Path) -> list[str]:
    """One CPU, a small object store, and every port a node would otherwise take by default
    (the dashboard agent's 52365, metrics) free and our own: two nodes share this host."""
    return [
        "--block",
        "--num-cpus=1",
        "--node-ip-address=127.0.0.1",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
        "--object-store-memory=100000000",
        "--include-log-monitor=false",
        f"--node-manager-port={_free_port()}",
        f"--object-manager-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
    ]


@dataclass
class Cluster:
    address: str
    node_ids: list[str]


@pytest.fixture()
def ray_cluster() -> Iterator[Cluster]:
    import ray

    temp_dir = Path(tempfile.mkdtemp(prefix="ofray", dir="/tmp"))  # short: socket paths
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        head = [
            RAY,
            "start",
            "--head",
            f"--port={port}",
            "--include-dashboard=false",
            f"--dashboard-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}",
            *_node_flags(temp_dir),
        ]
        with (temp_dir / "head.log").open("wb") as log:
            nodes.append(subprocess.Popen(head, env=env, stdout=log, stderr=log))
        second = [RAY, "start", f"--address={address}", *_node_flags(temp_dir / "second")]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.3)
        with (temp_dir / "second.log").open("wb") as log:
            nodes.append(subprocess.Popen(second, env=env, stdout=log, stderr=log))
        ray.init(address=address, logging_level="ERROR")
        try:
            alive: list[dict[str, object]] = []
            while time.monotonic() < deadline and len(alive) < 2:
                time.sleep(0.5)
                alive = [n for n in ray.nodes() if n["Alive"]]
            assert len(alive) == 2, f"the second Ray node did not join ({temp_dir}/*.log)"
            node_ids = [str(n["NodeID"]) for n in alive]
        finally:
            ray.shutdown()
        yield Cluster(address, node_ids)
    finally:
        for node in reversed(nodes):
            stop_tree(node, grace=5.0)
        _sweep(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _sweep(temp_dir: Path) -> None:
    """Kill what escaped the process trees: only processes naming our temp dir."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(temp_dir) in part for part in process.info["cmdline"] or []):
                process.kill()


def test_simulation_runs_clients_on_both_nodes_of_a_ray_cluster(
    ray_cluster: Cluster, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from coordinator.federation.simulation import RayEngine, run_flower_simulation
    from coordinator.state.folder import RunFolder
    from coordinator.state.plan import RunPlan

    clients = 4
    config = load_config(
        None,
        [
            f"federation.num_clients={clients}",
            "federation.rounds=1",
            f"federation.ray_address='{ray_cluster.address}'",
            "train.local_steps=1",
            "train.batch_size=4",
            "train.precision='fp32'",
            "data.max_length=32",
        ],
    )
    bundle = tiny_bundle(tiny_llama_dir, tmp_path / "bundle")
    data = tmp_path / "data"
    for index in range(clients):
        rows = [Example(t, label=lab) for lab in LABELS for t in tiny_texts(lab, 4, seed=index)]
        write_jsonl(rows, data / f"client-{index}.jsonl")
    RunFolder(tmp_path).write_config(config)
    plan_path = tmp_path / "plan.json"
    RunPlan(
        run_dir=str(tmp_path),
        bundle_path=str(bundle.path),
        bundle_digest=bundle.digest,
        data_dir=str(data),
        task_kind="classification",
        labels=LABELS,
        template="Text: {text}\nTopic:",
    ).save(plan_path)

    engine = RayEngine.from_config(config.federation)
    run_flower_simulation(plan_path, num_clients=clients, engine=engine)

    rounds = json.loads((tmp_path / "rounds.json").read_text())
    assert sorted(int(r["partition-id"]) for r in rounds) == list(range(clients))
    assert all("error" not in r for r in rounds), rounds
    # one actor per node (one CPU each): clients ran on both, in two worker processes
    ran_on = {int(r["ray-node"]) for r in rounds}
    assert ran_on == {int(node[:12], 16) for node in ray_cluster.node_ids}
    assert len({(r["ray-node"], r["worker-pid"]) for r in rounds}) == 2
    outcomes = json.loads((tmp_path / "outcomes.json").read_text())
    assert outcomes[-1]["outcome"].startswith(f"aggregated {clients} updates"), outcomes
    assert (tmp_path / "adapters" / "round-1.safetensors").is_file()

    # a run folder the nodes cannot see is refused before any round, in one line
    import ray

    from coordinator.federation.simulation import RayClusterError, _check_shared_folder

    ray.init(address=ray_cluster.address, logging_level="ERROR")
    try:
        with pytest.raises(RayClusterError, match="2 of 2 Ray nodes cannot read the run folder"):
            _check_shared_folder(tmp_path / "elsewhere" / "plan.json", ray_cluster.node_ids)
    finally:
        ray.shutdown()
