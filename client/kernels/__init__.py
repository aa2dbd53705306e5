"""Quantized kernels for the data owner's sparse fine-tuning (see ``linear`` and ``backends``)."""

from client.kernels.backends import BACKENDS, KernelBackend, backend_for
from client.kernels.linear import PackedLinear, freeze_float_linears, install_kernels
from client.kernels.packed import PackedWeight, dequantize_rows, pack_layer

__all__ = [
    "BACKENDS",
    "KernelBackend",
    "PackedLinear",
    "PackedWeight",
    "backend_for",
    "dequantize_rows",
    "freeze_float_linears",
    "install_kernels",
    "pack_layer",
]
