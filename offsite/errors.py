"""Domain errors and the one table of exit codes.

Each error says what is wrong and what to do; the CLI prints it on one line and exits with its
class's code. Every code means one thing (``ExitCode``); errors defined in other packages take
their code from this table, and ``offsite --help`` lists it.
"""

from __future__ import annotations

from enum import IntEnum, unique


@unique
class ExitCode(IntEnum):
    """What an ``offsite`` exit status means (0 success, 130 interrupted)."""

    RUNTIME = 1  # anything else that stopped the command
    CONFIG = 2
    DATA = 3
    MODEL = 4
    INTEGRITY = 5
    PRIVACY_GATE = 6
    TRAINING_FAILED = 7
    ENROLLMENT = 8
    REGISTRY = 9
    TRANSFER = 10
    FEDERATION_LINK = 11
    ADDRESS_IN_USE = 12
    SIMULATION_ENGINE = 13
    DASHBOARD_AUTH = 14
    INTERRUPTED = 130


EXIT_CODE_MEANINGS: dict[ExitCode, str] = {
    ExitCode.RUNTIME: "runtime error",
    ExitCode.CONFIG: "invalid configuration, flags or overrides",
    ExitCode.DATA: "data set missing, empty or unsupported",
    ExitCode.MODEL: "model not found or unsupported architecture",
    ExitCode.INTEGRITY: "bundle or artifact failed verification",
    ExitCode.PRIVACY_GATE: "emulator refused by the owner's privacy gate",
    ExitCode.TRAINING_FAILED: "no federated round aggregated an update",
    ExitCode.ENROLLMENT: "joining, keys or certificates refused",
    ExitCode.REGISTRY: "the coordinator's registry refused the operation",
    ExitCode.TRANSFER: "an artifact could not be delivered",
    ExitCode.FEDERATION_LINK: "the SuperLink or its fleet proxy failed",
    ExitCode.ADDRESS_IN_USE: "a port the coordinator needs is taken",
    ExitCode.SIMULATION_ENGINE: "the Ray cluster to simulate on is unreachable or too small",
    ExitCode.DASHBOARD_AUTH: "a dashboard beyond loopback without an admin token",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
}


def exit_code_table() -> str:
    """The exit codes, one per line, for ``--help`` and the docs."""
    lines = ["0 success", *(f"{int(code)} {EXIT_CODE_MEANINGS[code]}" for code in ExitCode)]
    return "; ".join(lines)


class OffsiteError(Exception):
    """Base class for every error a user can act on."""

    exit_code: ExitCode = ExitCode.RUNTIME


class ConfigError(OffsiteError):
    """The configuration (file, overrides or flags) is invalid."""

    exit_code = ExitCode.CONFIG


class DataError(OffsiteError):
    """A data set is missing, empty, or not in a supported format."""

    exit_code = ExitCode.DATA


class ModelError(OffsiteError):
    """A model cannot be found, loaded, or is of an unsupported architecture."""

    exit_code = ExitCode.MODEL


class IntegrityError(OffsiteError):
    """A bundle or artifact failed verification (digest, signature, names, shapes)."""

    exit_code = ExitCode.INTEGRITY
