"""Replies as they arrive: a Flower ``Grid`` whose ``send_and_receive`` is a stream.

Flower's ``Strategy.start`` hands ``aggregate_train`` whatever ``grid.send_and_receive``
returns, and Flower's grids return a list holding every reply of the round, so a coordinator
that waits for 100 clients holds 100 adapters at once. ``StreamingGrid`` pushes the messages
at once (as Flower does) and returns a generator that pulls replies with
``grid.pull_messages`` and yields each the moment it is pulled, so ``aggregate_train`` folds it
into a running sum (``coordinator.federation.aggregation.RunningMean``) and lets it go. The
deadline is Flower's, counted from the push: replies that arrive after ``timeout`` are not
pulled, and a caller slow to fold them loses none that were waiting by then (a last pull).

Every other call goes to the wrapped grid unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run


class StreamingGrid(Grid):
    """``grid`` with ``send_and_receive`` yielding replies one by one as they are pulled."""

    def __init__(self, grid: Grid, pull_interval: float | None = None):
        self._grid = grid
        # the in-memory (simulation) grid polls every 0.1 s; a SuperLink over the network: 1 s
        self._interval = pull_interval or float(getattr(grid, "pull_interval", 1.0))

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:  # Flower's NodeInfo (a protobuf message)
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages`` now; the replies, one at a time, until all came or ``timeout``
        (counted from the push, as Flower's grids do, however long the caller takes to fold each
        reply; once it has passed, one last pull takes the replies already waiting)."""
        pending = set(self._grid.push_messages(messages))
        if not pending:
            return []
        end = None if timeout is None else time.monotonic() + timeout
        return self._replies(pending, end)

    def _replies(self, pending: set[str], end: float | None) -> Iterator[Message]:
        while True:
            last = end is not None and time.monotonic() >= end
            for reply in self._grid.pull_messages(pending):
                pending.discard(reply.metadata.reply_to_message_id)
                yield reply
            if not pending or last:
                return
            wait = self._interval if end is None else min(self._interval, end - time.monotonic())
            time.sleep(max(0.0, wait))
