"""Every causal catalog model that installs offline, on its real weights: the split is faithful
and a federated round really trains.

- No block dropped, the emulator (in memory, and written as a bundle then loaded) gives the full
  model's logits, and the untrained adapter plugged back gives them too (max |Δlogit| bounded).
- A 2-client, 1-round simulation with a few local steps on the real model: every client's reply
  aggregates and the plug-in's logits move away from the full model's.

The MiniLM encoder is not in this list on purpose: federated runs score answers with a causal LM,
and `offsite simulate` refuses encoders with a one-line ModelError (tests/offsite/test_cli.py).
Gemma3-270m is used under the Gemma Terms of Use shipped with its package.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch

from offsite.catalog import model_cache_dir

MODELS = ["smollm2-135m", "gemma3-270m"]
pytestmark = pytest.mark.real_model
NO_DROP_BOUND = 1e-4  # fp32 logits; measured 0.0 on both models (bench/reports/layer_drop.md)


def _installed(name: str) -> None:
    if not (model_cache_dir(name) / "config.json").is_file():
        pytest.skip(f"`make test` prepares {name} (offsite prepare {name}); run it once")


@pytest.fixture(scope="module", params=MODELS)
def full(request: pytest.FixtureRequest):
    from coordinator.models import load_full_model

    _installed(request.param)
    model, tokenizer, arch, _ = load_full_model(request.param)
    return request.param, model, tokenizer, arch


TEXTS = ["Article: Shares in the bank rose sharply.\nTopic:", "The match ended in a draw."]


def test_no_drop_split_and_untrained_plug_in_give_the_full_models_logits(
    full, tmp_path: Path
) -> None:
    from emulator.adapter import AdapterSpec, attach_adapter
    from emulator.bundle import bundle_arch, load_bundle_model, verify_bundle, write_bundle
    from emulator.layers import plan_layers
    from emulator.plug import plug_adapter
    from emulator.split import build_emulator

    name, model, tokenizer, arch = full
    layers = model.config.num_hidden_layers
    plan = plan_layers(layers, 2, 2, -1)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        reference = model(**batch).logits
        in_memory = build_emulator(model, plan, arch)(**batch).logits
    assert (in_memory - reference)[mask].abs().max() <= NO_DROP_BOUND
    spec = AdapterSpec.for_plan("lora", plan, arch)
    written = write_bundle(model, tokenizer, plan, spec, tmp_path / "bundle", source=name)
    bundle = verify_bundle(written.path, written.digest)
    emulator = load_bundle_model(bundle)
    with torch.no_grad():
        loaded = emulator(**batch).logits
    assert (loaded - reference)[mask].abs().max() <= NO_DROP_BOUND
    adapted = attach_adapter(emulator, bundle_arch(bundle), spec, plan.emulator_to_full(), seed=0)
    with torch.no_grad():
        plugged = (
            plug_adapter(copy.deepcopy(model), spec, adapted.trainable_state())
            .model(**batch)
            .logits
        )
    assert (plugged - reference)[mask].abs().max() <= NO_DROP_BOUND


def test_a_federated_round_on_the_real_model_trains_the_adapter(full, tmp_path: Path) -> None:
    from coordinator.federation.simulation import run_flower_simulation
    from coordinator.state.adapters import load_adapter
    from coordinator.state.folder import RunFolder
    from coordinator.state.plan import RunPlan
    from emulator.adapter import AdapterSpec
    from emulator.arch import anchor_layers
    from emulator.build import build_bundle
    from emulator.layers import plan_layers
    from emulator.plug import plug_adapter
    from offsite.config import load_config
    from offsite.data import load_task, partition, write_jsonl

    name, model, tokenizer, arch = full
    config = load_config(
        None,
        [
            f"model.name='{name}'",
            "emulator.keep=2",
            # the default compression (fisher-svd on public text, folded norms, int8; by
            # output energy for an encoder) trains on every catalog model, small calibration
            "emulator.public_examples=4",
            "emulator.calibration_examples=8",
            "federation.num_clients=2",
            "federation.rounds=1",
            "train.local_steps=3",
            "train.batch_size=2",
            "data.max_length=64",
        ],
    )
    layers = model.config.num_hidden_layers
    plan = plan_layers(layers, 2, 2, 2, anchor_layers(model.config, arch))
    spec = AdapterSpec.for_plan("lora", plan, arch)
    bundle = build_bundle(
        model,
        tokenizer,
        arch,
        plan,
        spec,
        tmp_path / "bundle",
        source=name,
        settings=config.emulator,
    )
    task = load_task("bbc-news")
    sample = random.Random(0).sample(list(task.examples), 40)  # every topic, few examples
    for index, share in enumerate(partition(sample, 2, "iid", 1.0, 0)):
        write_jsonl(share, tmp_path / "data" / f"client-{index}.jsonl")
    RunFolder(tmp_path).write_config(config)
    RunPlan(
        run_dir=str(tmp_path),
        bundle_path=str(bundle.path),
        bundle_digest=bundle.digest,
        data_dir=str(tmp_path / "data"),
        task_kind=task.kind,
        labels=task.labels,
        template=task.template,
    ).save(tmp_path / "plan.json")
    run_flower_simulation(tmp_path / "plan.json", num_clients=2, client_cpus=1.0)

    rounds = json.loads((tmp_path / "rounds.json").read_text())
    assert len(rounds) == 2 and not [r for r in rounds if "error" in r or "quarantined" in r]
    outcomes = json.loads((tmp_path / "outcomes.json").read_text())
    assert [o["outcome"].split(":")[0] for o in outcomes if o["round"] == 1] == [
        "aggregated 2 updates"
    ]
    trained = load_adapter(tmp_path / "adapters" / "round-1.safetensors")
    start = load_adapter(tmp_path / "adapters" / "round-0.safetensors")
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        reference = model(**batch).logits
        plugged = plug_adapter(copy.deepcopy(model), spec, trained).model(**batch).logits
    assert (plugged - reference)[mask].abs().max() > 1e-3  # the adapter trained
