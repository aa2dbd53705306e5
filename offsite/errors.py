"""Domain errors. Each one says what is wrong and what to do; the CLI prints it on one line."""

from __future__ import annotations


class OffsiteError(Exception):
    """Base class for every error a user can act on."""

    exit_code = 1


class ConfigError(OffsiteError):
    """The configuration (file, overrides or flags) is invalid."""

    exit_code = 2


class DataError(OffsiteError):
    """A data set is missing, empty, or not in a supported format."""

    exit_code = 3


class ModelError(OffsiteError):
    """A model cannot be found, loaded, or is of an unsupported architecture."""

    exit_code = 4


class IntegrityError(OffsiteError):
    """A bundle or artifact failed verification (digest, signature, names, shapes)."""

    exit_code = 5
