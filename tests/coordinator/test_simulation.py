"""A real Flower simulation end to end on a tiny model: 2 clients, 2 rounds, five-way report."""

from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from offsite.config import load_config
from offsite.data import Example, write_jsonl
from offsite.errors import ExitCode, OffsiteError
from tests.conftest import LABELS, tiny_bundle, tiny_texts

pytestmark = pytest.mark.integration


@pytest.fixture()
def tiny_task(tmp_path: Path) -> Path:
    path = tmp_path / "task.jsonl"
    write_jsonl([Example(t, label=lab) for lab in LABELS for t in tiny_texts(lab, 30)], path)
    return path


def test_two_clients_two_rounds_end_to_end(
    tiny_llama_dir: Path, tiny_task: Path, tmp_path: Path
) -> None:
    from coordinator.workflow.simulate import simulate

    config = load_config(
        None,
        [
            f"model.name='{tiny_llama_dir}'",
            f"data.name='{tiny_task}'",
            "data.eval_size=15",
            "data.max_length=48",
            "emulator.bottom=1",
            "emulator.top=1",
            "emulator.keep=2",
            "federation.num_clients=2",
            "federation.rounds=2",
            "train.local_steps=3",
            "train.lr=0.005",
            "train.batch_size=4",
            "train.precision='fp32'",
            "eval.full_finetune=true",
            f"output_dir='{tmp_path / 'runs'}'",
        ],
    )
    result = simulate(config)
    run = result.run_dir

    for name in ("report.md", "metrics.json", "five_way.png", "loss_per_round.png", "config.toml"):
        assert (run / name).is_file(), name
    rounds = json.loads((run / "rounds.json").read_text())
    assert sorted((r["round"], int(r["partition-id"])) for r in rounds) == [
        (1, 0),
        (1, 1),
        (2, 0),
        (2, 1),
    ]
    assert all("error" not in r and r["train-loss"] > 0 for r in rounds)
    # two clients trained their LoRA factors apart: FedAvg of the factors is measurably inexact
    outcomes = json.loads((run / "outcomes.json").read_text())
    errors = [o["lora_product_error"] for o in outcomes if o["round"] > 0]
    assert len(errors) == 2 and all(0 < e < 1 for e in errors), errors
    assert {o["lora_aggregation"] for o in outcomes} == {"naive"}
    assert "naive LoRA averaging error" in (run / "report.md").read_text()

    adapters = {r: load_file(str(run / "adapters" / f"round-{r}.safetensors")) for r in (0, 1, 2)}
    assert adapters[0].keys() == adapters[2].keys()
    # only LoRA tensors of the adapter blocks (full-model indices 0 and 5) travel
    assert all("lora_" in k and (".layers.0." in k or ".layers.5." in k) for k in adapters[2])
    assert any(not torch.equal(adapters[0][k], adapters[2][k]) for k in adapters[0])

    metrics = json.loads((run / "metrics.json").read_text())
    scores = metrics["scores"]
    assert set(scores) == {
        "full_zero_shot",
        "emulator_zero_shot",
        "emulator_fine_tuned",
        "plug_in",
        "full_fine_tuned",
    }
    assert all(0.0 <= s["value"] <= 1.0 and s["count"] == 15 for s in scores.values())
    assert metrics["run"]["plan"] == "1-2-1"
    report = (run / "report.md").read_text()
    assert "plug-in" in report and "privacy margin" in report
    # the command that reruns it is the configuration's, whoever called simulate()
    command = metrics["run"]["command"]
    assert command.startswith("offsite simulate ") and "federation.rounds=2" in command
    assert load_config(None, shlex.split(command)[2:]) == config
    # `offsite eval RUN --round 2` re-scores the same adapter to the same numbers
    from coordinator.workflow.rerun import evaluate_run

    again = evaluate_run(run, 2)
    for key in ("full_zero_shot", "emulator_zero_shot", "emulator_fine_tuned", "plug_in"):
        assert again[key]["value"] == pytest.approx(scores[key]["value"], abs=1e-9), key
    # the emulator bundle never contains the dropped middle blocks (full indices 2 and 3)
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert manifest["layers"]["emulator_layers"] == [0, 1, 4, 5]
    shipped_blocks = {
        int(k.split(".layers.")[1].split(".")[0]) for k in manifest["tensors"] if ".layers." in k
    }
    assert shipped_blocks == {0, 1, 2, 3}  # four emulator blocks, renumbered; nothing else


def test_prompt_completion_task_on_a_quantized_emulator(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """Perplexity tasks score as such; clients load an int8 bundle and train through it."""
    from coordinator.workflow.simulate import simulate

    data = tmp_path / "qa.jsonl"
    rows = [
        Example(f"Q: {t}", completion=f" A: {lab}") for lab in LABELS for t in tiny_texts(lab, 12)
    ]
    write_jsonl(rows, data)
    config = load_config(
        None,
        [
            f"model.name='{tiny_llama_dir}'",
            f"data.name='{data}'",
            "data.eval_size=6",
            "emulator.bottom=1",
            "emulator.top=1",
            "emulator.keep=1",
            "emulator.quantize='int8'",
            "federation.num_clients=2",
            "federation.rounds=1",
            "train.local_steps=2",
            "train.precision='fp32'",
            f"output_dir='{tmp_path / 'runs'}'",
        ],
    )
    result = simulate(config)
    scores = json.loads((result.run_dir / "metrics.json").read_text())["scores"]
    assert {s["metric"] for s in scores.values()} == {"perplexity"}
    assert all(s["value"] > 1.0 for s in scores.values())
    assert "perplexity" in (result.run_dir / "report.md").read_text()
    manifest = json.loads((result.run_dir / "bundle" / "manifest.json").read_text())
    assert manifest["compression"]["quantization"]["scheme"]["name"] == "int8"
    rounds = json.loads((result.run_dir / "rounds.json").read_text())
    assert len(rounds) == 2 and all("error" not in r and r["train-loss"] > 0 for r in rounds)


def test_a_failing_client_does_not_end_the_run(
    tiny_llama_dir: Path, tiny_task: Path, tmp_path: Path
) -> None:
    """Client 1's data is corrupt: its replies are errors, FedAvg goes on with the others."""
    from coordinator.federation.simulation import run_flower_simulation
    from coordinator.state.folder import RunFolder
    from coordinator.state.plan import RunPlan

    config = load_config(
        None,
        [
            "federation.num_clients=3",
            "federation.rounds=2",
            "train.local_steps=2",
            "train.batch_size=4",
            "train.precision='fp32'",
            "data.max_length=48",
        ],
    )
    bundle = tiny_bundle(tiny_llama_dir, tmp_path / "bundle")
    data = tmp_path / "data"
    data.mkdir()
    lines = tiny_task.read_text().splitlines()
    (data / "client-0.jsonl").write_text("\n".join(lines[:30]) + "\n")
    (data / "client-1.jsonl").write_text("this is not json\n")
    (data / "client-2.jsonl").write_text("\n".join(lines[30:60]) + "\n")
    plan_path = tmp_path / "plan.json"
    RunFolder(tmp_path).write_config(config)
    RunPlan(
        run_dir=str(tmp_path),
        bundle_path=str(bundle.path),
        bundle_digest=bundle.digest,
        data_dir=str(data),
        task_kind="classification",
        labels=LABELS,
        template="Text: {text}\nTopic:",
    ).save(plan_path)

    run_flower_simulation(plan_path, num_clients=3, client_cpus=1.0)

    rounds = json.loads((tmp_path / "rounds.json").read_text())
    errors = [r for r in rounds if "error" in r]
    good = [r for r in rounds if "error" not in r]
    assert len(errors) == 2 and all("not valid JSON" in r["error"] for r in errors)
    assert sorted((r["round"], int(r["partition-id"])) for r in good) == [
        (1, 0),
        (1, 2),
        (2, 0),
        (2, 2),
    ]
    final = load_file(str(tmp_path / "adapters" / "round-2.safetensors"))
    start = load_file(str(tmp_path / "adapters" / "round-0.safetensors"))
    assert any(not torch.equal(final[k], start[k]) for k in start)


def test_differentially_private_run_reports_epsilon_per_round(
    tiny_llama_dir: Path, tiny_task: Path, tmp_path: Path
) -> None:
    """Clients clip and withhold data-dependent metrics; ε grows per round within the budget."""
    from coordinator.workflow.simulate import simulate

    config = load_config(
        None,
        [
            f"model.name='{tiny_llama_dir}'",
            f"data.name='{tiny_task}'",
            "data.eval_size=10",
            "data.max_length=48",
            "emulator.bottom=1",
            "emulator.top=1",
            "emulator.keep=2",
            "federation.num_clients=2",
            "federation.rounds=2",
            "federation.min_replies=2",
            "train.local_steps=2",
            "train.batch_size=4",
            "train.precision='fp32'",
            "privacy.epsilon=8.0",
            "privacy.clip_norm=0.01",
            f"output_dir='{tmp_path / 'runs'}'",
        ],
    )
    result = simulate(config)
    outcomes = json.loads((result.run_dir / "outcomes.json").read_text())
    spent = [o["epsilon"] for o in outcomes if o["round"] > 0]
    assert len(spent) == 2 and 0 < spent[0] < spent[1] <= 8.0
    rounds = json.loads((result.run_dir / "rounds.json").read_text())
    assert rounds and all(r.get("dp") == 1 and "train-loss" not in r for r in rounds)
    start = load_file(str(result.run_dir / "adapters" / "round-0.safetensors"))
    final = load_file(str(result.run_dir / "adapters" / "round-2.safetensors"))
    assert any(not torch.equal(final[k], start[k]) for k in start)
    assert "ε after each round" in (result.run_dir / "report.md").read_text()


def _federate_once(
    tiny_llama_dir: Path,
    tiny_task: Path,
    folder: Path,
    overrides: list[str],
    clients: int = 3,
    expect: str = "aggregated 3 updates",
    kind: str = "lora",
) -> dict[str, torch.Tensor]:
    """One round straight through Flower (no evaluation); the new global adapter."""
    from coordinator.federation.simulation import run_flower_simulation
    from coordinator.state.folder import RunFolder
    from coordinator.state.plan import RunPlan

    config = load_config(
        None,
        [
            f"federation.num_clients={clients}",
            "federation.rounds=1",
            "train.local_steps=2",
            "train.batch_size=4",
            "train.precision='fp32'",
            "data.max_length=48",
            *overrides,
        ],
    )
    bundle = tiny_bundle(tiny_llama_dir, folder / "bundle", kind)
    data = folder / "data"
    data.mkdir(parents=True)
    lines = tiny_task.read_text().splitlines()
    for index in range(clients):
        (data / f"client-{index}.jsonl").write_text("\n".join(lines[index::clients]) + "\n")
    plan_path = folder / "plan.json"
    RunFolder(folder).write_config(config)
    RunPlan(
        run_dir=str(folder),
        bundle_path=str(bundle.path),
        bundle_digest=bundle.digest,
        data_dir=str(data),
        task_kind="classification",
        labels=LABELS,
        template="Text: {text}\nTopic:",
    ).save(plan_path)
    run_flower_simulation(plan_path, num_clients=clients, client_cpus=1.0)
    outcomes = json.loads((folder / "outcomes.json").read_text())
    assert outcomes[-1]["outcome"].startswith(expect), outcomes
    return load_file(str(folder / "adapters" / "round-1.safetensors"))


def test_secure_aggregation_run_equals_plain_fedavg(
    tiny_llama_dir: Path, tiny_task: Path, tmp_path: Path
) -> None:
    """Masked updates, unmasked sum: the same global adapter as plain FedAvg (to fixed point)."""
    plain = _federate_once(tiny_llama_dir, tiny_task, tmp_path / "plain", [])
    secure = _federate_once(
        tiny_llama_dir, tiny_task, tmp_path / "secure", ["federation.secure_aggregation=true"]
    )
    assert plain.keys() == secure.keys()
    for name in plain:
        torch.testing.assert_close(secure[name], plain[name], rtol=0, atol=1e-6)
    rounds = json.loads((tmp_path / "secure" / "rounds.json").read_text())
    assert len(rounds) == 3 and all(r.get("secagg") == 1 for r in rounds)


@pytest.mark.integration
def test_frozen_a_lora_federates_exactly_and_uploads_only_b(
    tiny_llama_dir: Path, tiny_task: Path, tmp_path: Path
) -> None:
    """``lora-fa`` through Flower: A leaves the round as it came, FedAvg of B has no product
    error, and a sparse upload carries B alone (A did not change, so it is not sent)."""
    folder = tmp_path / "fa"
    state = _federate_once(
        tiny_llama_dir, tiny_task, folder, ["train.upload='sparse'"], kind="lora-fa"
    )
    start = load_file(str(folder / "adapters" / "round-0.safetensors"))
    a_names = [n for n in start if ".lora_A." in n]
    assert a_names and all(torch.equal(state[n], start[n]) for n in a_names)
    assert any(not torch.equal(state[n], start[n]) for n in start if ".lora_B." in n)
    outcome = json.loads((folder / "outcomes.json").read_text())[-1]
    assert outcome["lora_product_error"] < 1e-12, outcome
    assert outcome["lora_aggregation"] == "frozen-a"
    b_values = sum(start[n].numel() for n in start if ".lora_B." in n)
    for reply in json.loads((folder / "rounds.json").read_text()):
        assert reply["sparse-upload"] == 1 and reply["upload-bytes"] <= 4 * b_values + 4096


def test_sparse_upload_aggregates_exactly_like_dense_upload(
    tiny_llama_dir: Path, tiny_task: Path, tmp_path: Path
) -> None:
    """Clients send only their changes; rebuilt on the server, FedAvg is unchanged. With a
    top-k fraction each client sends a tenth of every tensor's entries."""
    dense = _federate_once(tiny_llama_dir, tiny_task, tmp_path / "dense", [])
    sparse = _federate_once(
        tiny_llama_dir, tiny_task, tmp_path / "sparse", ["train.upload='sparse'"]
    )
    assert dense.keys() == sparse.keys()
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], rtol=0, atol=1e-6)
    topk = _federate_once(
        tiny_llama_dir,
        tiny_task,
        tmp_path / "topk",
        ["train.upload='sparse'", "train.upload_fraction=0.1"],
    )
    start = load_file(str(tmp_path / "topk" / "adapters" / "round-0.safetensors"))
    rounds = json.loads((tmp_path / "topk" / "rounds.json").read_text())
    dense_rounds = json.loads((tmp_path / "dense" / "rounds.json").read_text())
    assert all(r.get("sparse-upload") == 1 for r in rounds)
    total = sum(t.numel() for t in start.values())
    # 10 % of the values, each with an int64 index: at most 0.1 x (8 + 4) bytes per value
    assert all(r["upload-bytes"] <= 0.1 * total * 12 + 12 * len(start) for r in rounds)
    assert "upload-bytes" not in dense_rounds[0]
    for name, value in topk.items():
        changed = int((value != start[name]).sum())
        assert 0 < changed <= 3 * math.ceil(0.1 * value.numel()), name


def test_a_memory_budget_is_planned_for_and_refused_with_the_numbers_when_too_small(
    tiny_llama_dir: Path, tiny_task: Path, tmp_path: Path
) -> None:
    roomy = _federate_once(
        tiny_llama_dir,
        tiny_task,
        tmp_path / "roomy",
        ["train.memory_budget='64GB'"],
        clients=2,
        expect="aggregated 2 updates",
    )
    assert roomy
    _federate_once(
        tiny_llama_dir,
        tiny_task,
        tmp_path / "tight",
        ["train.memory_budget='1MB'"],
        clients=2,
        expect="failed",
    )
    rounds = json.loads((tmp_path / "tight" / "rounds.json").read_text())
    assert len(rounds) == 2
    assert all("memory budget of 1MB" in r["error"] and "MiB" in r["error"] for r in rounds)


@pytest.mark.parametrize("attack", ["scale", "sign-flip"])
def test_two_of_ten_attackers_barely_move_trimmed_mean_but_damage_fedavg(
    tiny_llama_dir: Path, tiny_task: Path, tmp_path: Path, attack: str
) -> None:
    def run(name: str, overrides: list[str]) -> dict[str, torch.Tensor]:
        return _federate_once(
            tiny_llama_dir,
            tiny_task,
            tmp_path / name,
            overrides,
            clients=10,
            expect="aggregated 10",
        )

    attackers = ["faults.attackers=2", f"faults.attack='{attack}'", "faults.attack_scale=20"]
    trimmed = ["federation.aggregation='trimmed-mean'", "federation.trim_fraction=0.2"]
    clean = run("clean", [])
    attacked_fedavg = run("fedavg", attackers)
    attacked_trimmed = run("trimmed", [*attackers, *trimmed])
    start = load_file(str(tmp_path / "clean" / "adapters" / "round-0.safetensors"))

    def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        return float(sum((a[k].double() - b[k].double()).pow(2).sum() for k in a).sqrt())

    honest_step = distance(clean, start)
    assert distance(attacked_trimmed, clean) < 0.35 * honest_step
    assert distance(attacked_fedavg, clean) > 2 * honest_step


def test_a_killed_coordinator_resumes_and_matches_an_uninterrupted_run(
    tiny_llama_dir: Path, tiny_task: Path, tmp_path: Path
) -> None:
    """SIGKILL the whole run after round 2 is recorded; --resume finishes it identically."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from coordinator.workflow.simulate import simulate

    overrides = [
        f"model.name='{tiny_llama_dir}'",
        f"data.name='{tiny_task}'",
        "data.eval_size=10",
        "data.max_length=48",
        "emulator.bottom=1",
        "emulator.top=1",
        "emulator.keep=2",
        "federation.num_clients=2",
        "federation.rounds=3",
        "train.local_steps=2",
        "train.batch_size=4",
        "train.precision='fp32'",
    ]
    reference = simulate(load_config(None, overrides), tmp_path / "reference")

    run_dir = tmp_path / "killed"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "offsite.cli.main",
            "simulate",
            "--run-dir",
            str(run_dir),
            *overrides,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    marker = run_dir / "adapters" / "round-2.safetensors"
    deadline = time.monotonic() + 600
    while not marker.is_file() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # let the registry commit of round 2 land (or not: either is recoverable)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run_dir / "report.md").exists(), "the run finished before it could be killed"

    resumed = simulate(load_config(run_dir / "config.toml"), run_dir, resume=True)
    final = load_file(str(run_dir / "adapters" / "round-3.safetensors"))
    expected = load_file(str(reference.run_dir / "adapters" / "round-3.safetensors"))
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=0, atol=1e-6)
    for key, score in reference.scores.items():
        assert resumed.scores[key].value == pytest.approx(score.value, abs=1e-9), key
    outcomes = json.loads((run_dir / "outcomes.json").read_text())
    assert [o["round"] for o in outcomes if o["round"] > 0] == [1, 2, 3]


def test_a_ray_start_that_times_out_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from coordinator.federation import simulation

    real_init, calls = ray.init, []

    def flaky_init(**kwargs: object) -> object:
        calls.append(kwargs)
        if len(calls) == 1:
            raise Exception("The current node timed out during startup.")  # what Ray raises
        return real_init(**kwargs)

    monkeypatch.setattr(ray, "init", flaky_init)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # _start_ray sets it
    monkeypatch.setattr(simulation.time, "sleep", lambda _seconds: None)
    try:
        simulation._start_ray({"num_cpus": 1, "include_dashboard": False})
        assert ray.is_initialized() and len(calls) == 2
        assert calls[1]["runtime_env"] == {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}}
    finally:
        ray.shutdown()


def test_a_ray_start_that_keeps_failing_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from coordinator.federation import simulation

    def failing_init(**_kwargs: object) -> None:
        raise Exception("The current node timed out during startup.")

    monkeypatch.setattr(ray, "init", failing_init)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    monkeypatch.setattr(simulation.time, "sleep", lambda _seconds: None)
    with pytest.raises(OffsiteError, match="ray stop"):
        simulation._start_ray({"num_cpus": 1})
    assert not ray.is_initialized()


def _cli_run(tiny_llama_dir: Path, tiny_task: Path, run: Path, *extra: str):
    import subprocess
    import sys

    return subprocess.run(
        [
            sys.executable,
            "-m",
            "offsite.cli.main",
            "simulate",
            "--run-dir",
            str(run),
            f"model.name='{tiny_llama_dir}'",
            f"data.name='{tiny_task}'",
            "data.eval_size=12",
            "data.max_length=48",
            "emulator.bottom=1",
            "emulator.top=1",
            "emulator.keep=2",
            "federation.num_clients=2",
            "train.local_steps=2",
            "train.batch_size=4",
            "train.precision='fp32'",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_run_in_which_every_client_fails_exits_nonzero_with_the_first_failure(
    tiny_llama_dir: Path, tiny_task: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    result = _cli_run(
        tiny_llama_dir,
        tiny_task,
        run,
        "federation.rounds=2",
        "faults.attackers=2",
        "faults.attack='crash'",
    )
    assert result.returncode == ExitCode.TRAINING_FAILED, result.stdout + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "no round aggregated an update" in errors[0] and "round 1, client" in errors[0]
    assert "--verbose" in errors[0]
    assert "privacy margin" not in result.stdout + result.stderr
    assert "| plug-in" not in result.stdout + result.stderr  # no five-way table
    report = (run / "report.md").read_text()
    assert "failed" in report.splitlines()[0] and "privacy margin" not in report
    assert not (run / "five_way.png").exists()


def test_a_run_where_some_clients_failed_says_so_above_the_table_and_atop_the_report(
    tiny_llama_dir: Path, tiny_task: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    result = _cli_run(
        tiny_llama_dir,
        tiny_task,
        run,
        "federation.rounds=1",
        "faults.attackers=1",
        "faults.attack='crash'",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    warning = output.index("WARNING: 1 of 2 client replies failed (first: round 1, client ")
    assert warning < output.index("| plug-in")
    assert "RuntimeError: injected crash of client 0)" in output[warning:].splitlines()[0]
    report = (run / "report.md").read_text().splitlines()
    assert report[2].startswith("**Warning: 1 of 2 client replies failed")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["training"]["adapter_changed"] and metrics["training"]["aggregated_rounds"] == 1


@pytest.mark.integration
def test_merge_exact_federates_mixed_ranks_and_secure_sums_give_the_same_merge(
    tiny_llama_dir: Path, tiny_task: Path, tmp_path: Path
) -> None:
    """``merge-exact`` through Flower with clients of ranks 4, 2, 1: the adapter blocks' base
    weights travel and move, the next round starts from a fresh LoRA (B = 0), the outcome
    records the mode. Under secure aggregation the nodes send their dense ΔW instead of their
    factors, and the unmasked mean gives the same merged base (to fixed point): what the nodes
    computed is what the coordinator computes from factors."""
    from emulator.lora_merge import split_bases

    merge = ["federation.lora_aggregation='merge-exact'", "train.client_ranks='4,2,1'"]
    plain = _federate_once(tiny_llama_dir, tiny_task, tmp_path / "plain", merge)
    start = load_file(str(tmp_path / "plain" / "adapters" / "round-0.safetensors"))
    bases_start, lora_start = split_bases(start)
    bases, lora = split_bases(plain)
    assert bases_start and bases.keys() == bases_start.keys() and lora.keys() == lora_start.keys()
    assert all(not torch.equal(bases[n], bases_start[n]) for n in bases)
    assert all(not lora[n].any() for n in lora if ".lora_B." in n)
    assert all(not torch.equal(lora[n], lora_start[n]) for n in lora if ".lora_A." in n)
    outcome = json.loads((tmp_path / "plain" / "outcomes.json").read_text())[-1]
    assert outcome["lora_aggregation"] == "merge-exact"
    assert "lora_product_error" not in outcome  # mixed ranks: naive could not even add them
    replies = json.loads((tmp_path / "plain" / "rounds.json").read_text())
    assert sorted(r["lora-rank"] for r in replies) == [1, 2, 4]
    # measured on the wire: every node downloads the base weights too, and uploads its factors
    state_bytes = sum(4 * t.numel() for t in start.values())
    lora_bytes = sum(4 * t.numel() for t in lora_start.values())
    assert state_bytes <= outcome["download_bytes"] <= state_bytes + 4096 * len(start)
    assert all(r["received-bytes"] <= lora_bytes + 4096 * len(lora) for r in replies)

    secure = _federate_once(
        tiny_llama_dir,
        tiny_task,
        tmp_path / "secure",
        [*merge, "federation.secure_aggregation=true"],
        expect="aggregated 3 updates (secure)",
    )
    assert secure.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(secure[name], plain[name], rtol=0, atol=1e-6)
    # …but a secure upload is the masked dense ΔW, 8 bytes per base-weight value
    dense = 8 * sum(t.numel() for t in bases_start.values())
    replies = json.loads((tmp_path / "secure" / "rounds.json").read_text())
    assert all(dense <= r["received-bytes"] <= dense + 4096 for r in replies)
