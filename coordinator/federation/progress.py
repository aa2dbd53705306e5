"""Round-level progress for federated runs (the ServerApp's view)."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from offsite.wire.messages import TrainReply


class RoundProgress:
    """One bar over rounds; the postfix shows how many clients replied and their mean loss."""

    def __init__(self, rounds: int) -> None:
        self._bar = tqdm(total=rounds, desc="federated rounds", unit="round", dynamic_ncols=True)
        self._losses: list[float] = []
        self._failed = 0

    def client_done(self, report: dict[str, Any]) -> None:
        if "error" in report or "quarantined" in report:
            self._failed += 1
        elif (reply := TrainReply.from_report(report)) and reply.train_loss is not None:
            self._losses.append(reply.train_loss)
        loss = sum(self._losses) / len(self._losses) if self._losses else float("nan")
        self._bar.set_postfix(clients=len(self._losses), failed=self._failed, loss=f"{loss:.3f}")

    def round_done(self, server_round: int, outcome: dict[str, Any] | None = None) -> None:
        """Advance; a failed round or the privacy spent so far is shown to the user."""
        if outcome is not None:
            if not str(outcome.get("outcome", "aggregated")).startswith("aggregated"):
                self._bar.write(f"round {server_round}: {outcome['outcome']}")
            if "epsilon" in outcome:
                self._bar.set_postfix(epsilon=f"{outcome['epsilon']:.2f}")
        self._bar.update(1)
        self._losses.clear()
        self._failed = 0

    def close(self) -> None:
        self._bar.close()
