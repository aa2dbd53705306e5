"""Which blocks go where: the adapter/emulator layer plan and block renumbering.

The uniform layer drop reproduces the offsite-tuning reference exactly: over the ``n`` middle
blocks, keep offsets ``round(i * (n - 1) / (k - 1))`` for ``i in range(k)`` with Python's
round-half-even. Building, training and evaluation all use this one routine (the reference code
had a bug where they differed).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from offsite.errors import ConfigError


def uniform_drop(n_middle: int, keep: int) -> list[int]:
    """Offsets (0-based, into the middle blocks) kept by the reference uniform layer drop."""
    if not 1 <= keep <= n_middle:
        raise ConfigError(
            f"cannot keep {keep} of {n_middle} middle blocks; set emulator.keep between 1 and "
            f"{n_middle} (or -1 for all)"
        )
    if keep == 1:
        return [round((n_middle - 1) / 2)]
    return [round(i * (n_middle - 1) / (keep - 1)) for i in range(keep)]


@dataclass(frozen=True)
class LayerPlan:
    """Split of a ``num_layers``-block model into adapter blocks and kept middle blocks.

    All indices are full-model block indices.
    """

    num_layers: int
    bottom: tuple[int, ...]
    middle_kept: tuple[int, ...]
    top: tuple[int, ...]

    @property
    def adapter_layers(self) -> tuple[int, ...]:
        return self.bottom + self.top

    @property
    def emulator_layers(self) -> tuple[int, ...]:
        """Full-model index of each emulator block, in emulator order."""
        return self.bottom + self.middle_kept + self.top

    @property
    def dropped_layers(self) -> tuple[int, ...]:
        kept = set(self.emulator_layers)
        return tuple(i for i in range(self.num_layers) if i not in kept)

    def full_to_emulator(self) -> dict[int, int]:
        return {full: emu for emu, full in enumerate(self.emulator_layers)}

    def emulator_to_full(self) -> dict[int, int]:
        return dict(enumerate(self.emulator_layers))

    def adapter_layers_in_emulator(self) -> tuple[int, ...]:
        mapping = self.full_to_emulator()
        return tuple(mapping[i] for i in self.adapter_layers)

    @property
    def label(self) -> str:
        return f"{len(self.bottom)}-{len(self.middle_kept)}-{len(self.top)}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerPlan:
        return cls(
            num_layers=int(data["num_layers"]),
            bottom=tuple(int(i) for i in data["bottom"]),
            middle_kept=tuple(int(i) for i in data["middle_kept"]),
            top=tuple(int(i) for i in data["top"]),
        )


def plan_layers(
    num_layers: int, bottom: int, top: int, keep: int, anchors: Sequence[int] = ()
) -> LayerPlan:
    """Plan adapter blocks (``bottom`` + ``top``) and ``keep`` uniformly chosen middle blocks.

    ``anchors`` (full-model indices) are middle blocks kept first — the global-attention layers
    of a model that mixes attention types (``anchor_layers``) — and the rest of ``keep`` is
    spread uniformly over the other middle blocks; without anchors the choice is exactly the
    reference layer drop."""
    if bottom + top >= num_layers:
        raise ConfigError(
            f"the model has {num_layers} blocks; emulator.bottom + emulator.top = {bottom + top} "
            "must leave at least one middle block"
        )
    middle = list(range(bottom, num_layers - top))
    if keep != -1:
        uniform_drop(len(middle), keep)  # the standard error for a keep that cannot fit
    pinned = [i for i in middle if i in set(anchors)]
    if keep == -1:
        kept = middle
    elif pinned and len(pinned) < keep:
        others = [i for i in middle if i not in pinned]
        kept = sorted(pinned + [others[o] for o in uniform_drop(len(others), keep - len(pinned))])
    elif pinned:  # fewer kept blocks than anchors: spread over the anchors
        kept = [pinned[o] for o in uniform_drop(len(pinned), keep)]
    else:
        kept = [middle[o] for o in uniform_drop(len(middle), keep)]
    return LayerPlan(
        num_layers=num_layers,
        bottom=tuple(range(bottom)),
        middle_kept=tuple(kept),
        top=tuple(range(num_layers - top, num_layers)),
    )


def renumber_key(key: str, prefix: str, mapping: Mapping[int, int]) -> str | None:
    """Rewrite ``{prefix}.{i}.rest`` to ``{prefix}.{mapping[i]}.rest``.

    Returns the key unchanged when it is not a block key, and ``None`` for a block not in
    ``mapping`` (a block that must not be carried over).
    """
    match = re.match(rf"^((?:.*\.)?{re.escape(prefix)}\.)(\d+)(\..*)$", key)
    if match is None:
        return key
    index = int(match.group(2))
    if index not in mapping:
        return None
    return f"{match.group(1)}{mapping[index]}{match.group(3)}"


def block_index(key: str, prefix: str) -> int | None:
    match = re.match(rf"^(?:.*\.)?{re.escape(prefix)}\.(\d+)\.", key)
    return int(match.group(1)) if match else None


def block_part(name: str, prefix: str) -> str | None:
    """The block-relative part of a module name ``{prefix}.{i}.{part}`` (``"mlp"``,
    ``"self_attn.q_proj"``), or None for a name outside the blocks under ``prefix``."""
    index = block_index(name, prefix)
    head = f"{prefix}.{index}."
    return name[len(head) :] if index is not None and name.startswith(head) else None


def renumber_state(
    state: Mapping[str, Any], prefix: str, mapping: Mapping[int, int]
) -> dict[str, Any]:
    """Renumber every block key of a state dict; blocks outside ``mapping`` are dropped."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        new_key = renumber_key(key, prefix, mapping)
        if new_key is not None:
            out[new_key] = value
    return out


def slice_per_layer(values: Sequence[Any], layers: Sequence[int]) -> list[Any]:
    return [values[i] for i in layers]
