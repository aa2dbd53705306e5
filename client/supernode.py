"""Run this node's Flower SuperNode against the coordinator's SuperLink.

``offsite client start`` launches ``flower-supernode`` with the CA pinned at enrollment, the
node's authentication key (its public half was registered when the node joined) and a node
config naming the local data and the identity folder; the ClientApp reads both from
``context.node_config`` (``data-path``, ``identity-dir``) and fetches the run's bundle from the
artifact service into the identity's locked cache.
"""

from __future__ import annotations

import sys
from pathlib import Path

from client.identity import JoinError, NodeIdentity


def node_config(identity: NodeIdentity, data: Path, memory_budget: str | None = None) -> str:
    """Flower's ``--node-config`` string for this node."""
    values: dict[str, object] = {
        "data-path": Path(data).resolve(),
        "identity-dir": identity.folder.resolve(),
    }
    if memory_budget:
        values["memory-budget"] = memory_budget
    for key, value in values.items():
        if '"' in str(value):
            raise JoinError(f"{key} {value} contains a double quote; use another folder")
    return " ".join(f'{key}="{value}"' for key, value in values.items())


def supernode_command(
    identity: NodeIdentity,
    data: Path,
    port: int,
    superlink: str | None = None,
    memory_budget: str | None = None,
) -> list[str]:
    """The ``flower-supernode`` command line for this node (``port``: its local ClientApp API)."""
    if not identity.flower_key.is_file():
        raise JoinError(
            f"{identity.folder} has no Flower key; join again with `offsite client join`"
        )
    if not Path(data).exists():
        raise JoinError(f"data path {data} does not exist; pass this node's training data")
    return [
        str(Path(sys.executable).parent / "flower-supernode"),
        "--superlink",
        superlink or identity.superlink_address,
        "--root-certificates",
        str(identity.ca.resolve()),
        "--auth-supernode-private-key",
        str(identity.flower_key.resolve()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--node-config",
        node_config(identity, data, memory_budget),
    ]
