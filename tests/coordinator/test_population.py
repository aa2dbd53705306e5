"""A population on the simulation engine: 200 registered clients, 100 sampled per round (issue
24's 100-client simulation), on a tiny model, with label- and quantity-skewed shares. Clients
are cheap: the two Ray workers train all of them in turn, each worker loading the bundle once
(17 s on an idle 2-core machine, 47 s beside other work; 10 per round took ~53 s)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from offsite.config import load_config
from offsite.data import Example, partition, write_jsonl
from tests.conftest import LABELS, tiny_bundle, tiny_texts

pytestmark = pytest.mark.integration


def test_two_hundred_registered_hundred_sampled_per_round(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from coordinator.federation.simulation import RayEngine, run_flower_simulation
    from coordinator.state.folder import RunFolder
    from coordinator.state.plan import RunPlan

    registered, rounds = 200, 2
    config = load_config(
        None,
        [
            f"federation.num_clients={registered}",
            "federation.fraction_train=0.5",
            f"federation.rounds={rounds}",
            "train.local_steps=1",
            "train.batch_size=2",
            "train.precision='fp32'",
            "data.max_length=24",
            "data.alpha=0.3",
            "data.quantity_alpha=1.0",
        ],
    )
    sampled = config.federation.sampled_clients
    assert sampled == 100
    bundle = tiny_bundle(tiny_llama_dir, tmp_path / "bundle")
    examples = [Example(t, label=lab) for lab in LABELS for t in tiny_texts(lab, 200)]
    data = config.data
    shares = partition(examples, registered, data.partition, data.alpha, 0, data.quantity_alpha)
    for index, share in enumerate(shares):
        write_jsonl(share, tmp_path / "data" / f"client-{index}.jsonl")
    RunFolder(tmp_path).write_config(config)
    RunPlan(
        run_dir=str(tmp_path),
        bundle_path=str(bundle.path),
        bundle_digest=bundle.digest,
        data_dir=str(tmp_path / "data"),
        task_kind="classification",
        labels=LABELS,
        template="Text: {text}\nTopic:",
    ).save(tmp_path / "plan.json")

    engine = RayEngine.from_config(config.federation)
    run_flower_simulation(tmp_path / "plan.json", registered, engine=engine)

    reports = json.loads((tmp_path / "rounds.json").read_text())
    assert all("error" not in r for r in reports), reports
    by_round: dict[int, set[int]] = defaultdict(set)
    for report in reports:
        by_round[report["round"]].add(int(report["partition-id"]))
    assert sorted(by_round) == [1, 2]
    assert all(len(ids) == sampled for ids in by_round.values()), by_round
    assert by_round[1] != by_round[2]  # sampled afresh each round
    sizes = {int(r["partition-id"]): int(r["num-examples"]) for r in reports}
    assert all(sizes[i] == len(shares[i]) for i in sizes)
    outcomes = json.loads((tmp_path / "outcomes.json").read_text())
    assert [o["outcome"].split(" (")[0] for o in outcomes if o["round"] > 0] == [
        f"aggregated {sampled} updates"
    ] * rounds
    # cheap clients: at most one worker per CPU trains them all, each loading the bundle once;
    # its peak memory does not grow with the clients it serves
    workers = Counter(int(r["worker-pid"]) for r in reports)
    assert len(workers) <= 2 and sum(workers.values()) == sampled * rounds
    peaks: dict[int, list[float]] = defaultdict(list)
    for report in reports:
        peaks[int(report["worker-pid"])].append(float(report["worker-peak-rss-mb"]))
    assert all(max(p) - min(p) < 100 for p in peaks.values()), peaks
