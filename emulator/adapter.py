"""The trainable adapter: which tensors train, and how they move between models.

Decisions:
- ``lora``: PEFT LoRA on the registry's target linears, restricted to the adapter blocks with
  ``layers_to_transform`` — the same object PEFT, vLLM and TGI load, so export is direct.
- ``full``: every parameter of the adapter blocks trains.
- On the wire and on disk, trainable tensors carry *full-model* block numbering, so an update from
  any emulator plugs into the full model (and into other emulators) without translation tables.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from emulator.arch import ArchSpec, block_list, block_prefix
from emulator.layers import LayerPlan, renumber_state
from emulator.lora_merge import base_name, lora_modules, split_bases
from offsite.errors import IntegrityError
from offsite.policies import POLICIES, UpdatePolicy


def _trains(part: str, name: str, arch: ArchSpec) -> bool:
    """Whether the parameter ``name`` (inside a block) trains under block rule ``part``."""
    if part == "all":
        return True
    if part == "none":
        return False
    module, _, leaf = name.rpartition(".")
    small = leaf == "bias" or module in arch.block_norms
    if part == "small":
        return small
    if part == "outputs":
        return small or any(
            module == suffix or module.endswith("." + suffix) for suffix in arch.output_projections
        )
    raise ValueError(f"unknown block rule {part!r}")


@dataclass(frozen=True)
class AdapterSpec:
    kind: str  # an update policy: a key of POLICIES
    layers: tuple[int, ...]  # full-model indices of the adapter blocks
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ()
    top: tuple[int, ...] = ()  # full-model indices of the top adapter blocks

    @classmethod
    def for_plan(
        cls, kind: str, plan: LayerPlan, arch: ArchSpec, lora_r: int = 8, lora_alpha: int = 16
    ) -> AdapterSpec:
        """The adapter of ``plan``'s bottom and top blocks under update policy ``kind``."""
        return cls(
            kind, plan.adapter_layers, lora_r, lora_alpha, arch.lora_targets, tuple(plan.top)
        )

    @property
    def trained_layers(self) -> tuple[int, ...]:
        """Full-model indices of the blocks the policy trains in (all, or only the top ones)."""
        if self.policy.top_only:
            return tuple(i for i in self.layers if i in self.top)
        return self.layers

    @property
    def policy(self) -> UpdatePolicy:
        if self.kind not in POLICIES:
            raise ValueError(f"unknown adapter kind {self.kind!r}; use one of {sorted(POLICIES)}")
        return POLICIES[self.kind]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterSpec:
        return cls(
            kind=str(data["kind"]),
            layers=tuple(int(i) for i in data["layers"]),
            lora_r=int(data.get("lora_r", 8)),
            lora_alpha=int(data.get("lora_alpha", 16)),
            lora_targets=tuple(data.get("lora_targets", ())),
            top=tuple(int(i) for i in data.get("top", ())),
        )


@dataclass
class AdaptedModel:
    """A model with its adapter attached, and the block-index map to full-model numbering."""

    model: nn.Module
    spec: AdapterSpec
    arch: ArchSpec
    prefix: str  # state-dict prefix of the block list inside ``model``
    to_full: dict[int, int]  # this model's block index -> full-model block index
    # adapter tensors that do not train (LoRA's A under ``lora-fa``), by parameter name
    frozen: frozenset[str] = frozenset()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {
            n: p for n, p in self.model.named_parameters() if p.requires_grad or n in self.frozen
        }

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors (fp32, CPU, contiguous) under full-model names: those that
        train, and the frozen ones the adapter also consists of (LoRA's A under ``lora-fa``)."""
        state = renumber_state(self._adapter_parameters(), self.prefix, self.to_full)
        return {
            k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()
        }

    def load_trainable(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy the full-model-named adapter tensors in (``trainable_state``'s names); names and
        shapes must match exactly. LoRA base weights in ``state`` (a merge-exact adapter:
        ``lora_base_state``'s names) replace the modules' base weights."""
        from_full = {full: own for own, full in self.to_full.items()}
        bases, state = split_bases(state)
        own = renumber_state(state, self.prefix, from_full)
        params = self._adapter_parameters()
        missing = sorted(set(params) - set(own))
        extra = sorted(set(own) - set(params))
        if missing or extra or len(own) != len(state):
            raise IntegrityError(
                f"adapter tensors do not match the model: {len(missing)} missing "
                f"(e.g. {missing[:2]}), {len(extra) + len(state) - len(own)} unexpected "
                f"(e.g. {extra[:2]}); was it trained for another model or adapter spec?"
            )
        with torch.no_grad():
            for name, value in own.items():
                target = params[name]
                if tuple(value.shape) != tuple(target.shape):
                    raise IntegrityError(
                        f"adapter tensor {name} has shape {tuple(value.shape)}, "
                        f"expected {tuple(target.shape)}"
                    )
                target.copy_(value.to(target.dtype))
        self._load_bases(renumber_state(bases, self.prefix, from_full), len(bases))

    def _load_bases(self, own: Mapping[str, torch.Tensor], sent: int) -> None:
        """Copy merge-exact base weights in (``lora_base_state``'s names)."""
        if not sent:
            return
        params = dict(self.model.named_parameters())
        unknown = sorted(set(own) - set(params))
        if unknown or len(own) != sent:
            raise IntegrityError(
                f"{sent - len(own) + len(unknown)} LoRA base weights do not belong to this "
                f"model's adapter blocks (e.g. {unknown[:2]}); was it trained for another model?"
            )
        with torch.no_grad():
            for name, value in own.items():
                if tuple(value.shape) != tuple(params[name].shape):
                    raise IntegrityError(
                        f"LoRA base weight {name} has shape {tuple(value.shape)}, "
                        f"expected {tuple(params[name].shape)}"
                    )
                params[name].copy_(value.to(params[name].dtype))

    def lora_base_state(self) -> dict[str, torch.Tensor]:
        """The base weights of the LoRA modules (fp32, full-model names): what merge-exact
        aggregation folds the clients' ΔW into. ``load_trainable`` takes them back."""
        params = dict(self.model.named_parameters())
        names = [base_name(n) for n in lora_modules(params)]
        state = renumber_state({n: params[n] for n in names}, self.prefix, self.to_full)
        return {
            k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()
        }


# (model, block-list prefix, local block indices, target names, r, alpha, seed) -> wrapped model
LoraWrap = Callable[[nn.Module, str, Sequence[int], Sequence[str], int, int, int], nn.Module]


def attach_adapter(
    model: nn.Module,
    arch: ArchSpec,
    spec: AdapterSpec,
    to_full: Mapping[int, int],
    seed: int = 0,
    lora: LoraWrap | None = None,
) -> AdaptedModel:
    """Freeze ``model`` and make the tensors of ``spec``'s update policy trainable.

    LoRA goes through PEFT, or through ``lora`` when given (the client's lean runtime builds
    PEFT's tree itself); the other policies unfreeze the blocks' own tensors. Nothing below
    the lowest trainable tensor requires a gradient, so backward stops there.
    """
    from_full = {full: own for own, full in to_full.items()}
    policy = spec.policy
    if policy.top_only and not spec.top:
        raise ValueError(f"the {spec.kind!r} policy needs the adapter's top blocks (spec.top)")
    local_layers = [from_full[i] for i in spec.trained_layers]
    blocks = block_list(model, arch)
    for p in model.parameters():
        p.requires_grad_(False)
    targets = list(spec.lora_targets or arch.lora_targets)
    if policy.lora and lora is not None:
        prefix = block_prefix(model, arch, blocks)
        model = lora(model, prefix, local_layers, targets, spec.lora_r, spec.lora_alpha, seed)
    elif policy.lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=spec.lora_r,
            lora_alpha=spec.lora_alpha,
            lora_dropout=0.0,
            target_modules=targets,
            layers_to_transform=local_layers,
            layers_pattern=arch.layers_pattern,
            fan_in_fan_out=arch.lora_fan_in_fan_out,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = get_peft_model(model, config)
    else:
        top_local = {from_full[i] for i in spec.top}
        for index in local_layers:
            part = policy.top if index in top_local or not spec.top else policy.bottom
            for name, p in blocks[index].named_parameters():
                p.requires_grad_(_trains(part, name, arch))
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(
                f"the {spec.kind!r} policy selects no tensor of {arch.model_type} adapter blocks "
                f"{list(spec.layers)}; choose another train.adapter"
            )
    frozen: frozenset[str] = frozenset()
    if policy.lora and policy.frozen_lora_a:
        frozen = frozenset(n for n, _ in model.named_parameters() if ".lora_A." in n)
        for name, parameter in model.named_parameters():
            if name in frozen:
                parameter.requires_grad_(False)
    prefix = block_prefix(model, arch, blocks)
    return AdaptedModel(model, spec, arch, prefix, dict(to_full), frozen)


def merged_model(adapted: AdaptedModel) -> nn.Module:
    """The plain model with the adapter folded in (LoRA merged; full blocks already in place)."""
    if adapted.spec.policy.lora:
        from peft import PeftModel

        assert isinstance(adapted.model, PeftModel)  # attach_adapter wrapped it
        # PeftModel forwards merge_and_unload to its LoRA tuner through an untyped __getattr__
        merged: nn.Module = adapted.model.merge_and_unload()
        return merged
    return adapted.model
