"""The adapter trains, only the declared tensors change, and names survive the round trip."""

from __future__ import annotations

import pytest
import torch

from emulator.adapter import AdapterSpec, attach_adapter
from emulator.arch import arch_spec
from emulator.examples import training_batches
from emulator.layers import plan_layers
from emulator.split import build_emulator
from emulator.train import train_adapter
from offsite.data import Example
from offsite.errors import IntegrityError
from tests.conftest import LABELS, tiny_model, tiny_texts


def _emulator_with_adapter(kind: str):
    full = tiny_model("llama")
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 2)
    emulator = build_emulator(full, plan, arch)
    spec = AdapterSpec(kind, plan.adapter_layers, 4, 8, arch.lora_targets)
    return attach_adapter(emulator, arch, spec, plan.emulator_to_full(), seed=0), plan


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_training_lowers_loss_and_touches_only_the_adapter(kind: str, tokenizer) -> None:
    adapted, _ = _emulator_with_adapter(kind)
    frozen_before = {
        n: p.detach().clone() for n, p in adapted.model.named_parameters() if not p.requires_grad
    }
    examples = [Example(t, label=lab) for lab in LABELS for t in tiny_texts(lab, 16)]
    batches = training_batches(
        tokenizer,
        examples,
        "Text: {text}\nTopic:",
        max_words=10,
        max_length=48,
        batch_size=8,
        seed=0,
    )
    torch.manual_seed(0)
    result = train_adapter(
        adapted, batches, steps=30, lr=5e-3, precision="fp32", device=torch.device("cpu")
    )
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5
    for name, param in adapted.model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, frozen_before[name]), f"frozen tensor {name} changed"
    state = adapted.trainable_state()
    # names use full-model block numbering: the top adapter block is 5 (emulator index 3)
    assert any(".layers.5." in k for k in state) and not any(".layers.3." in k for k in state)


def test_trainable_state_round_trips_and_mismatches_are_refused() -> None:
    adapted, _ = _emulator_with_adapter("lora")
    state = adapted.trainable_state()
    other, _ = _emulator_with_adapter("lora")
    other.load_trainable(state)
    assert all(torch.equal(other.trainable_state()[k], v) for k, v in state.items())
    extra = dict(state, **{"model.layers.9.bogus": torch.zeros(1)})
    with pytest.raises(IntegrityError, match="unexpected"):
        other.load_trainable(extra)
    missing = dict(list(state.items())[1:])
    with pytest.raises(IntegrityError, match="missing"):
        other.load_trainable(missing)
    key = next(iter(state))
    wrong = dict(state, **{key: torch.zeros(3, 3)})
    with pytest.raises(IntegrityError, match="shape"):
        other.load_trainable(wrong)


def test_fedprox_proximal_term_pulls_the_update_towards_the_global_adapter(tokenizer) -> None:
    adapted, _ = _emulator_with_adapter("lora")
    start = {k: v.clone() for k, v in adapted.trainable_state().items()}  # the global adapter
    examples = [Example(t, label=lab) for lab in LABELS for t in tiny_texts(lab, 8)]

    def update(**kwargs: float) -> torch.Tensor:
        adapted.load_trainable(start)
        batches = training_batches(
            tokenizer,
            examples,
            "Text: {text}\nTopic:",
            max_words=10,
            max_length=48,
            batch_size=4,
            seed=0,
        )
        torch.manual_seed(0)
        train_adapter(
            adapted,
            batches,
            steps=5,
            lr=5e-3,
            precision="fp32",
            device=torch.device("cpu"),
            **kwargs,
        )
        after = adapted.trainable_state()
        return torch.cat([(after[k] - start[k]).reshape(-1) for k in sorted(start)])

    plain = update()
    assert torch.equal(update(proximal_mu=0.0), plain)  # mu = 0 is FedAvg, bit for bit
    prox = update(proximal_mu=50.0)
    assert not torch.allclose(prox, plain)
    assert float(prox.norm()) < 0.9 * float(plain.norm())
