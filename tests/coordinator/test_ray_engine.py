"""Where a simulation runs: ``federation.ray_address`` and per-client resources (no Ray started)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from coordinator.federation.simulation import (
    RayClusterError,
    RayEngine,
    check_reachable,
    slots,
)
from offsite.config import load_config
from offsite.errors import ConfigError, ExitCode
from tests.offsite.test_cli import offsite
from tests.offsite.test_one_line_errors import _one_line

GB = 10**9


def test_config_keys_validate_addresses_and_sizes() -> None:
    federation = load_config(
        None,
        [
            "federation.ray_address='10.0.0.5:6379'",
            "federation.client_gpus=0.5",
            "federation.client_memory='1.5GB'",
        ],
    ).federation
    engine = RayEngine.from_config(federation)
    assert engine.client_resources() == {"num_cpus": 1.0, "num_gpus": 0.5, "memory": 1.5e9}
    # joining a cluster: its resources are its own (Ray refuses num_cpus then)
    assert engine.init_args()["address"] == "10.0.0.5:6379"
    assert "num_cpus" not in engine.init_args()
    local = RayEngine.from_config(load_config().federation)
    assert local.init_args()["address"] == "local" and local.init_args()["num_cpus"] >= 1
    assert "memory" not in local.client_resources()
    for good in ("auto", "ray://head.ray.svc:10001", "[::1]:6379", "raycluster-head-svc:6379"):
        assert load_config(None, [f"federation.ray_address='{good}'"]).federation.ray_address
    with pytest.raises(ConfigError) as caught:
        load_config(
            None,
            [
                "federation.ray_address='http://10.0.0.5'",
                "federation.client_memory='lots'",
                "federation.client_gpus=-1",
            ],
        )
    message = str(caught.value)
    assert "is not a Ray cluster address; write HOST:PORT" in message
    assert "federation.client_memory: cannot read the size 'lots'" in message
    assert "federation.client_gpus must be >= 0" in message
    with pytest.raises(ConfigError, match="not a Ray cluster address"):
        load_config(None, ["federation.ray_address='10.0.0.5:99999'"])


def test_slots_count_cpus_gpus_and_memory() -> None:
    node = {"CPU": 4.0, "GPU": 1.0, "memory": 8.0 * GB}
    assert slots(RayEngine(client_cpus=1.0), node) == (4, 4)
    assert slots(RayEngine(client_cpus=1.0, client_gpus=0.5), node) == (2, 2)
    assert slots(RayEngine(client_cpus=1.0, client_memory=3 * GB), node) == (4, 2)
    assert slots(RayEngine(client_cpus=2.0, client_memory=3 * GB), node) == (2, 2)


def test_capacity_is_checked_before_any_round() -> None:
    """Flower sizes its actor pool by CPUs and GPUs alone: a memory reservation that would leave
    actors unscheduled (their messages would wait for the round timeout) is refused, as is a
    cluster that cannot host one client."""
    from coordinator.federation.simulation import _check_capacity

    nodes = [{"CPU": 4.0, "memory": 8.0 * GB}, {"CPU": 1.0, "memory": 2.0 * GB}]
    _check_capacity(RayEngine(client_cpus=2.0, client_memory=3 * GB), nodes)
    with pytest.raises(RayClusterError, match="fits 4 clients by CPU but only 2 by"):
        _check_capacity(RayEngine(client_cpus=1.0, client_memory=3 * GB), nodes)
    with pytest.raises(RayClusterError, match=r"no node of the Ray cluster .* can host a client"):
        _check_capacity(RayEngine(client_cpus=1.0, client_gpus=1.0), nodes)


def test_unreachable_cluster_fails_within_seconds() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(RayClusterError, match=f"no Ray cluster answers at .*127.0.0.1:{port}"):
        check_reachable(f"127.0.0.1:{port}")
    assert time.monotonic() - start < 6
    assert RayClusterError.exit_code == ExitCode.SIMULATION_ENGINE == 13


@pytest.mark.integration  # a CLI subprocess: ~12 s of imports on a busy 2-core machine
def test_simulate_against_an_unreachable_cluster_is_one_line(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """`offsite simulate` checks the address before it builds anything: exit code 13."""
    from offsite.data import Example, write_jsonl
    from tests.conftest import LABELS, tiny_texts

    data = tmp_path / "task.jsonl"
    write_jsonl([Example(t, label=lab) for lab in LABELS for t in tiny_texts(lab, 10)], data)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = offsite(
        "simulate",
        f"model.name={tiny_llama_dir}",
        f"data.name={data}",
        "data.eval_size=6",
        f"federation.ray_address=127.0.0.1:{port}",
        f"output_dir={tmp_path / 'runs'}",
    )
    _one_line(result, 13, "no Ray cluster answers at federation.ray_address")
    assert not (tmp_path / "runs").exists()
