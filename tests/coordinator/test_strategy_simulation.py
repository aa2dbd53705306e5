"""A real Flower simulation with a server optimizer (FedAdam) on a tiny model, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from offsite.config import load_config
from offsite.data import Example, write_jsonl
from tests.conftest import LABELS, tiny_texts

pytestmark = pytest.mark.integration


def test_fedadam_run_steps_each_coordinate_by_at_most_the_server_rate(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from coordinator.workflow.simulate import simulate

    task = tmp_path / "task.jsonl"
    write_jsonl([Example(t, label=lab) for lab in LABELS for t in tiny_texts(lab, 20)], task)
    eta = 0.002
    config = load_config(
        None,
        [
            f"model.name='{tiny_llama_dir}'",
            f"data.name='{task}'",
            "data.eval_size=10",
            "data.max_length=48",
            "emulator.bottom=1",
            "emulator.top=1",
            "emulator.keep=2",
            "federation.num_clients=2",
            "federation.rounds=2",
            "federation.strategy='fedadam'",
            f"federation.server_lr={eta}",
            "train.local_steps=2",
            "train.lr=0.005",
            "train.batch_size=4",
            "train.precision='fp32'",
            "eval.full_finetune=false",
            f"output_dir='{tmp_path / 'runs'}'",
        ],
    )
    run = simulate(config).run_dir
    outcomes = json.loads((run / "outcomes.json").read_text())
    assert [o["outcome"] for o in outcomes if o["round"] > 0] == ["aggregated 2 updates"] * 2
    adapters = {r: load_file(str(run / "adapters" / f"round-{r}.safetensors")) for r in (0, 1, 2)}
    # Adam's first step moves a coordinate by at most eta·sqrt(1+b2)/(1+b1) (Flower's bias
    # correction), however large the clients' mean update: FedAvg would follow the mean.
    bound = eta * (1 + 0.99) ** 0.5 / (1 + 0.9)
    steps = torch.cat([(adapters[1][k] - adapters[0][k]).reshape(-1) for k in adapters[0]])
    assert 0 < float(steps.abs().max()) <= bound * (1 + 1e-4)
    assert all(adapters[2][k].dtype == adapters[0][k].dtype for k in adapters[0])
    assert any(not torch.equal(adapters[1][k], adapters[2][k]) for k in adapters[0])
