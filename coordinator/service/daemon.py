"""``offsite coordinator serve``: the coordinator's long-running services, started and watched.

What runs, and who may reach it:

| service | listens on | who |
|---|---|---|
| enrollment (gRPC, TLS) | ``enroll`` | anyone with a one-time token |
| artifacts + node service (gRPC, mutual TLS) | ``artifacts`` | enrolled, unrevoked nodes |
| Fleet proxy (nginx, TLS) | ``flower`` | SuperNodes with a registered key (Flower node auth) |
| SuperLink (Fleet + Control + Runtime API) | ``control``, loopback only | the coordinator |
| app registry (HTTP) | an ephemeral loopback port | the SuperLink |
| Fleet gate (HTTP) | an ephemeral loopback port | nginx (``auth_request``) |

Every port is checked free before anything starts (a second coordinator fails with "address in
use" and leaves the first one untouched), files are created readable by their owner only, and
a watcher thread reconciles the SuperLink's nodes with the registry every few seconds and stops
everything if the SuperLink or the proxy dies.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.service.app_registry import AppRegistry
from coordinator.service.audit import Audit
from coordinator.service.fleet_gate import FleetGate
from coordinator.service.fleet_proxy import FleetProxy
from coordinator.service.flower_link import DEFAULT_CONTROL, UNREGISTERED, FlowerLink
from coordinator.service.grpc_server import (
    AddressInUse,
    CoordinatorServer,
    build_server,
    state_paths,
)
from coordinator.service.pki import app_signing_key
from coordinator.store import Store
from offsite.crypto import parse_flower_public_key
from offsite.errors import OffsiteError
from offsite.host.network import is_loopback
from offsite.host.processes import stop_tree

log = logging.getLogger(__name__)
RECONCILE_SECONDS = 3.0


def private_files() -> None:
    """Everything this process (and its children: SuperLink, nginx) creates is owner-only."""
    os.umask(0o077)


def secure_state(folder: Path) -> None:
    """Take group and other permissions off a state folder made before files were private."""
    for path in [Path(folder), *Path(folder).rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            path.chmod(mode & 0o700)


def require_free(address: str) -> None:
    """AddressInUse if something already listens on ``address`` (host:port)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            probe.bind((host, int(port)))
        except OSError as err:
            why = "address in use" if err.errno == errno.EADDRINUSE else str(err.strerror).lower()
            raise AddressInUse(f"cannot listen on {address}: {why}") from err


def admitted_keys(store: Store) -> list[bytes]:
    """The SuperNode keys (PEM) of enrolled, unrevoked nodes: what the Fleet gate lets in."""
    keys = []
    for key in store.flower_keys():
        if key.active and key.public_key:
            try:
                keys.append(parse_flower_public_key(key.public_key))
            except ValueError:
                log.warning("node %s has an unreadable Flower key; it is not admitted", key.name)
    return keys


@dataclass
class CoordinatorDaemon:
    """The services of one coordinator state folder (see the module docstring)."""

    state: Path
    store: Store
    enroll: str
    artifacts: str
    flower: str | None  # public Fleet address; None: no SuperLink
    control: str = DEFAULT_CONTROL
    insecure: bool = False
    stop: threading.Event = field(default_factory=threading.Event)
    _children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> CoordinatorServer:
        """Start everything; raises (and leaves nothing running) when any part cannot start."""
        # Flower's modules are imported before any helper thread runs: two threads importing
        # flwr at once can deadlock on its circular imports (seen as _DeadlockError).
        import offsite.wire.flower_control  # noqa: F401  (imports the Flower modules it needs)

        pki, files = state_paths(self.state)
        audit = Audit(self.state)
        if self.flower is not None:
            if not is_loopback(self.control):
                raise OffsiteError(
                    f"--control {self.control} is not a loopback address: the SuperLink's "
                    "Control API must be reachable from this host only"
                )
            for address in (self.flower, self.control):
                require_free(address)
        built = build_server(
            self.store, pki, files, self.enroll, self.artifacts, insecure=self.insecure, audit=audit
        )
        if self.flower is None:
            built.server.start()
            return built
        app_signing_key(pki)  # made now for state folders that predate app signing
        link = FlowerLink.of_state(self.state, self.flower, self.control)
        registry = AppRegistry(self.state).start()
        gate = FleetGate().start()
        try:
            self._children.append(link.start(pki, registry.url))
            proxy = FleetProxy(link.home / "proxy", self.flower, self.control, gate.port)
            self._children.append(proxy.start(pki))
        except BaseException:
            self.shutdown()
            registry.stop()
            gate.stop()
            raise
        built.enrollment.superlink_port = int(self.flower.rpartition(":")[2])

        def reconcile() -> None:
            with self._lock:
                link.reconcile(self.store, audit)
                gate.admit(admitted_keys(self.store))

        def renew(name: str, public_key: str) -> bool:
            with self._lock:
                current = {k.name: k for k in self.store.flower_keys()}.get(name)
                if current is not None and current.public_key and current.flower_node_id:
                    held = {n.node_id: n.status for n in link.nodes()}
                    if held.get(current.flower_node_id, UNREGISTERED) != UNREGISTERED:
                        return False
                    audit.record(
                        "superlink-node-lost",
                        node=name,
                        node_id=current.flower_node_id,
                        reason="its SuperLink registration is gone (seen when the node asked)",
                    )
                self.store.set_flower_key(name, public_key)
                audit.record("flower-key-renewed", node=name)
                link.reconcile(self.store, audit)
                gate.admit(admitted_keys(self.store))
                return True

        built.enrollment.on_enrolled = reconcile
        built.nodes.renew = renew
        reconcile()

        def watch() -> None:
            while not self.stop.wait(RECONCILE_SECONDS):
                try:
                    reconcile()
                except Exception:  # the watcher must outlive any one failed reconcile
                    log.exception("reconciling the SuperLink failed; retrying")
                for child, what in zip(self._children, ("SuperLink", "Fleet proxy"), strict=True):
                    if child.poll() is not None:
                        log.error("the %s exited (%s); stopping", what, child.returncode)
                        self.stop.set()
            registry.stop()
            gate.stop()

        threading.Thread(target=watch, daemon=True, name="coordinator-watch").start()
        built.server.start()
        return built

    def shutdown(self) -> None:
        self.stop.set()
        for child in reversed(self._children):
            stop_tree(child)
        self._children.clear()
