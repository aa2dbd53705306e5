"""Offsite: federated offsite-tuning of large models (adapter + emulator, plugged back in)."""

from offsite.errors import ConfigError, DataError, IntegrityError, ModelError, OffsiteError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "IntegrityError",
    "ModelError",
    "OffsiteError",
    "__version__",
]
