"""Run this node's Flower SuperNode against the coordinator's SuperLink, and keep it running.

``offsite client start`` launches ``flower-supernode`` with the CA pinned at enrollment, the
node's authentication key (its public half was registered when the node joined), Flower's
``--trusted-entities`` holding only the coordinator's app-signing key pinned at enrollment (the
SuperNode refuses, before any of its code runs, every app that key did not sign), and a node
config naming the local data and the identity folder; the ClientApp reads both from
``context.node_config`` (``data-path``, ``identity-dir``) and fetches the run's bundle from the
artifact service into the identity's locked cache.

When the SuperNode exits on its own (the SuperLink dropped its registration, the link broke),
``supervise`` asks the coordinator over mutual TLS whether its key is still admitted, sends a
fresh one if not (Flower never re-admits an unregistered key), and starts it again after a
growing pause; a revoked node stops with a one-line reason.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from client.identity import JoinError, NodeIdentity, RevokedError, renew_flower_key
from client.node_config import DATA_PATH, IDENTITY_DIR, LORA_RANK, MEMORY_BUDGET
from offsite.host.allocator import Allocator, allocator_env
from offsite.host.processes import flower_env, start_child, stop_tree

log = logging.getLogger(__name__)

BACKOFF = (2.0, 5.0, 10.0, 30.0, 60.0)


def node_config(
    identity: NodeIdentity, data: Path, memory_budget: str | None = None, lora_rank: int = 0
) -> str:
    """Flower's ``--node-config`` string for this node (``lora_rank`` 0: the run's)."""
    values: dict[str, object] = {
        DATA_PATH: Path(data).resolve(),
        IDENTITY_DIR: identity.folder.resolve(),
    }
    if memory_budget:
        values[MEMORY_BUDGET] = memory_budget
    if lora_rank:
        values[LORA_RANK] = lora_rank
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
    lora_rank: int = 0,
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
        "--trusted-entities",
        str(identity.write_trusted_entities().resolve()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--node-config",
        node_config(identity, data, memory_budget, lora_rank),
    ]


def supervise(
    identity: NodeIdentity,
    launch: Callable[[], subprocess.Popen[bytes]],
    stopping: Callable[[], bool],
    on_start: Callable[[subprocess.Popen[bytes]], None] = lambda _: None,
) -> int:
    """Run the SuperNode ``launch`` starts until ``stopping()``; restart it when it exits on
    its own, re-keying first when the coordinator says its key is no longer admitted.

    Returns 0 when stopped, or raises RevokedError when the coordinator refuses the node.
    """
    failures = 0
    while True:
        started = time.monotonic()
        process = launch()
        on_start(process)
        code = process.wait()
        if stopping():
            return 0
        if time.monotonic() - started > 300:
            failures = 0  # it ran for a while: start the pauses over
        pause = BACKOFF[min(failures, len(BACKOFF) - 1)]
        failures += 1
        log.warning("the SuperNode exited with code %s; checking this node's registration", code)
        try:
            renewed = renew_flower_key(identity)
        except RevokedError:
            raise
        except JoinError as err:
            log.warning("%s; retrying in %.0f s", err, pause)
        else:
            log.warning(
                "the coordinator admitted a fresh Flower key"
                if renewed
                else "this node's Flower key is still admitted"
            )
        deadline = time.monotonic() + pause
        while time.monotonic() < deadline:
            if stopping():
                return 0
            time.sleep(0.2)


def run_supernode(
    identity: NodeIdentity,
    data: Path,
    port: int,
    superlink: str | None,
    memory_budget: str | None,
    allocator: Allocator,
    lora_rank: int = 0,
) -> int:
    """Run this node's SuperNode until SIGINT/SIGTERM (``offsite client start``): started in
    our process group with ``allocator``, supervised and restarted by ``supervise``, and its
    whole process tree stopped on a signal, even one that arrives while it is starting."""
    home = identity.folder / "flower"
    home.mkdir(exist_ok=True)
    supernode_command(identity, data, port, superlink, memory_budget, lora_rank)  # checks first
    stopping = threading.Event()
    running: list[subprocess.Popen[bytes]] = []

    def launch() -> subprocess.Popen[bytes]:
        command = supernode_command(identity, data, port, superlink, memory_budget, lora_rank)
        return start_child(command, allocator_env(flower_env(home), allocator))

    def started(process: subprocess.Popen[bytes]) -> None:
        running[:] = [process]
        if stopping.is_set():  # a signal arrived while it was starting
            stop_tree(process)

    def stop(*_: object) -> None:
        stopping.set()
        for process in running:
            stop_tree(process)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    return supervise(identity, launch, stopping.is_set, on_start=started)
