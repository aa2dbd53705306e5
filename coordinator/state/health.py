"""Did the federation train? Failed rounds and client failures of a run, said up front.

A run whose every round failed (every client crashed, or none replied in time) kept its initial
adapter: evaluating it would print a five-way table whose plug-in equals zero-shot and a
"privacy margin" for an adapter that never trained. ``RunHealth`` reads the run folder's round
verdicts and client reports (``coordinator.state.folder``) so the run can stop with the first
client failure instead, and a run that partly failed can say so before any number is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from coordinator.state.folder import RunFolder
from offsite.errors import ExitCode, OffsiteError
from offsite.wire.messages import TrainReply

# "SomeError: message" / "pkg.SomeException: message" on a line of its own
_EXCEPTION_LINE = re.compile(r"^\s*((?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception)): (.+)$")
_WRAPPERS = ("ClientAppException", "RayTaskError")
SHORT = 200


class TrainingFailed(OffsiteError):
    """No round of the federation aggregated an update."""

    exit_code = ExitCode.TRAINING_FAILED


def short_error(reason: str, limit: int = SHORT) -> str:
    """The innermost ``Type: message`` of an error report (Ray and Flower wrap the client's
    exception in tracebacks), on one line and at most ``limit`` characters."""
    found = []
    for line in reason.splitlines():
        match = _EXCEPTION_LINE.match(line)
        if match and not any(w in match.group(1) for w in _WRAPPERS):
            found.append(f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2).strip()}")
    text = found[-1] if found else " ".join(reason.split())
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class ClientFailure:
    round: int
    client: str  # partition id in simulation, node id in deployment
    error: str  # shortened

    def describe(self) -> str:
        return f"round {self.round}, client {self.client}: {self.error}"


@dataclass(frozen=True)
class RunHealth:
    rounds: int  # rounds the run was asked for
    aggregated: int  # rounds that produced a new global adapter
    failed_rounds: tuple[tuple[int, str], ...]  # (round, verdict)
    client_failures: tuple[ClientFailure, ...]
    replies: int  # client reports seen

    @classmethod
    def read(cls, folder: RunFolder, rounds: int) -> RunHealth:
        outcomes = folder.outcomes()
        reports = folder.client_reports()
        verdicts = [(int(o["round"]), str(o.get("outcome", ""))) for o in outcomes]
        verdicts = [(r, v) for r, v in verdicts if r > 0]
        failures = tuple(
            ClientFailure(
                int(r.get("round", 0)),
                _client_name(r),
                short_error(str(r.get("error") or r.get("quarantined"))),
            )
            for r in reports
            if r.get("error") or r.get("quarantined")
        )
        return cls(
            rounds=rounds,
            aggregated=sum(1 for _, v in verdicts if not v.startswith("failed")),
            failed_rounds=tuple((r, v) for r, v in verdicts if v.startswith("failed")),
            client_failures=failures,
            replies=len(reports),
        )

    @property
    def trained(self) -> bool:
        return self.aggregated > 0

    @property
    def clean(self) -> bool:
        return not self.failed_rounds and not self.client_failures

    def warning(self) -> str:
        """One line for the top of the CLI table and the report; empty when all went well."""
        if self.clean:
            return ""
        parts = []
        if self.failed_rounds:
            rounds = ", ".join(str(r) for r, _ in self.failed_rounds)
            parts.append(f"{len(self.failed_rounds)} of {self.rounds} rounds failed ({rounds})")
        if self.client_failures:
            first = self.client_failures[0].describe()
            parts.append(
                f"{len(self.client_failures)} of {self.replies} client replies failed "
                f"(first: {first})"
            )
        return "; ".join(parts)

    def failure(self, folder: RunFolder) -> TrainingFailed:
        """The error of a run in which no round aggregated anything."""
        if self.client_failures:
            why = f"every client failed; first: {self.client_failures[0].describe()}"
        else:
            why = self.failed_rounds[0][1] if self.failed_rounds else "no round ran"
        return TrainingFailed(
            f"no round aggregated an update, the adapter never trained ({why}); see "
            f"{folder.client_reports_path}, re-run with --verbose for the clients' logs, or "
            "try federation.num_clients=1 federation.rounds=1 to debug one client"
        )


def adapter_changed(folder: RunFolder, state: dict[str, Any]) -> bool:
    """Whether ``state`` differs from the run's starting adapter (round 0); True when there is
    no starting adapter to compare with."""
    import torch

    from coordinator.state.adapters import load_adapter

    start_path = folder.adapter_path(0)
    if not start_path.is_file():
        return True
    start = load_adapter(start_path)
    if start.keys() != state.keys():
        return True
    return any(not torch.equal(start[k], state[k]) for k in start)


def _client_name(report: dict[str, Any]) -> str:
    """A failed client as the user knows it: its partition, else the node id."""
    reply = TrainReply.from_report(report)
    return str(reply.partition_id) if reply else str(report.get("node-id", "?"))
