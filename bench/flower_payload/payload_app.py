"""One Flower message of ``size`` random bytes to the only node, acknowledged with its length.

The ServerApp times the round trip of the payload message and of a 1-byte message before and
after it (fixed overhead: ClientApp process start, polling; the faster one is kept), and writes
them to ``out`` (JSON).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


def _round_trip(grid: Grid, node: int, size: int) -> tuple[float, int]:
    payload = np.frombuffer(os.urandom(size), dtype=np.uint8)  # random: no dedup shortcuts
    message = Message(RecordDict({"blob": ArrayRecord([payload])}), node, "train")
    start = time.perf_counter()
    (reply,) = list(grid.send_and_receive([message], timeout=3600))
    seconds = time.perf_counter() - start
    return seconds, int(reply.content["ack"]["bytes"])


@server.main()
def main(grid: Grid, context: Context) -> None:
    size = int(context.run_config["size"])
    deadline = time.monotonic() + 120
    nodes: list[int] = []
    while not nodes and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    node = nodes[0]
    before, _ = _round_trip(grid, node, 1)
    seconds, received = _round_trip(grid, node, size)
    after, _ = _round_trip(grid, node, 1)
    Path(str(context.run_config["out"])).write_text(
        json.dumps({"empty_seconds": min(before, after), "seconds": seconds, "received": received})
    )


@client.train()
def train(msg: Message, context: Context) -> Message:
    (blob,) = msg.content["blob"].to_numpy_ndarrays()
    ack = MetricRecord({"bytes": int(blob.nbytes)})
    return Message(RecordDict({"ack": ack}), reply_to=msg)
