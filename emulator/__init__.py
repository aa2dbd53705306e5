"""ML core of Offsite: architecture registry, layer drop, bundles, adapters, training, scoring.

No networking, Flower or database imports here (a test enforces it).
"""

from emulator.adapter import AdaptedModel, AdapterSpec, attach_adapter
from emulator.arch import REGISTRY, ArchSpec, arch_spec
from emulator.bundle import Bundle, load_bundle_model, verify_bundle, write_bundle
from emulator.layers import LayerPlan, plan_layers, uniform_drop
from emulator.plug import plug_adapter

__all__ = [
    "REGISTRY",
    "AdaptedModel",
    "AdapterSpec",
    "ArchSpec",
    "Bundle",
    "LayerPlan",
    "arch_spec",
    "attach_adapter",
    "load_bundle_model",
    "plan_layers",
    "plug_adapter",
    "uniform_drop",
    "verify_bundle",
    "write_bundle",
]
