"""The coordinator's Flower SuperLink: loopback-only, behind the Fleet proxy, led by the registry.

``offsite coordinator serve`` starts ``flower-superlink`` with the coordinator's TLS certificate,
SuperNode authentication on, runtime dependency installation and telemetry off, its state in
``<state>/flower`` and its one HTTP port (Fleet + Control + Runtime API) bound to loopback
(``control``); nodes reach only its Fleet API, through nginx on ``address``
(coordinator/service/fleet_proxy.py). Its app registry is the coordinator's own
(coordinator/service/app_registry.py), so the only app nodes will run is the one the coordinator
signed.

The registry is the source of truth for which SuperNode keys the SuperLink admits
(``reconcile``, at start and every few seconds): an enrolled node's key is registered, a revoked
node's unregistered, a registration the registry does not know is removed, and an enrolled node
unregistered behind the registry's back is noted so the node can re-key (Flower never admits an
unregistered key again; the node's ``client start`` sends a fresh one over mutual TLS). Every
change goes to the audit log. ``offsite run`` drives federations through this folder's ``flwr``
connection (``<state>/flower/config.toml``, the loopback address).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.service.audit import Audit
from coordinator.service.pki import Pki
from coordinator.store import Store
from offsite.crypto import parse_flower_public_key
from offsite.errors import ExitCode, OffsiteError
from offsite.host.processes import flower_env, start_child, stop_tree, wait_for_port

if TYPE_CHECKING:  # imported where used: it imports Flower
    from offsite.wire.flower_control import ControlNode, FlowerControl

log = logging.getLogger(__name__)

CONNECTION = "offsite"
DEFAULT_CONTROL = "127.0.0.1:9303"
UNREGISTERED = "unregistered"


class FlowerLinkError(OffsiteError):
    exit_code = ExitCode.FEDERATION_LINK


@dataclass(frozen=True)
class FlowerLink:
    """The SuperLink of one coordinator state folder."""

    home: Path  # FLWR_HOME of the coordinator side
    address: str  # public host:port of the Fleet API (the proxy), what nodes are told
    control: str = DEFAULT_CONTROL  # loopback host:port of the SuperLink itself
    started_at: float = 0.0  # Unix time the running SuperLink was started (0 = unknown)

    @classmethod
    def of_state(
        cls, state: Path, address: str | None = None, control: str | None = None
    ) -> FlowerLink:
        """The link of ``state``; without ``address``, the one ``serve`` last recorded."""
        home = Path(state).resolve() / "flower"
        if address is None:
            recorded = home / "link.json"
            if not recorded.is_file():
                raise FlowerLinkError(
                    f"{state} has no running Flower SuperLink on record; start it with "
                    "`offsite coordinator serve`"
                )
            saved = json.loads(recorded.read_text())
            address, control = str(saved["address"]), str(saved.get("control", DEFAULT_CONTROL))
            return cls(home, address, control or DEFAULT_CONTROL, float(saved.get("started", 0)))
        return cls(home, address, control or DEFAULT_CONTROL)

    def command(self, pki: Pki) -> list[str]:
        host, _, port = self.control.rpartition(":")
        scripts = Path(sys.executable).parent
        return [
            str(scripts / "flower-superlink"),
            "--host",
            host.strip("[]"),
            "--port",
            port,
            "--ssl-ca-certfile",
            str(pki.ca_cert),
            "--ssl-certfile",
            str(pki.server_cert),
            "--ssl-keyfile",
            str(pki.server_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--database",
            str(self.home / "superlink.db"),
            "--log-file",
            str(self.home / "superlink.log"),
        ]

    def write_cli_config(self, pki: Pki, started: float = 0.0) -> None:
        """The ``flwr`` connection ``offsite run`` uses (the loopback Control API), and in
        ``link.json`` where the SuperLink listens and when it was ``started``."""
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            "[superlink]\n"
            f'default = "{CONNECTION}"\n\n'
            f"[superlink.{CONNECTION}]\n"
            f'address = "{self.control}"\n'
            f'root-certificates = "{pki.ca_cert.resolve()}"\n'
        )
        (self.home / "link.json").write_text(
            json.dumps({"address": self.address, "control": self.control, "started": started})
        )

    def start(self, pki: Pki, registry_url: str, timeout: float = 60.0) -> subprocess.Popen[bytes]:
        """Start the SuperLink (its app hub: ``registry_url``); returns once it accepts
        connections."""
        self.write_cli_config(pki, started=time.time())  # before: no heartbeat predates it
        env = flower_env(self.home)
        env["FLWR_SUPERGRID_API_URL"] = registry_url
        process = start_child(
            self.command(pki),
            env,
            cwd=self.home,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(self.control, timeout, process)
        except (ChildProcessError, TimeoutError) as err:
            stop_tree(process)
            raise FlowerLinkError(
                f"the Flower SuperLink did not start on {self.control} ({err}); see "
                f"{self.home / 'superlink.log'}"
            ) from err
        return process

    # ------------------------------------------------------------------ Control API (loopback)

    @contextmanager
    def _control(self) -> Iterator[FlowerControl]:
        """Flower's own Control API client (what ``flwr`` uses), in process: a call costs
        milliseconds where the ``flwr`` CLI costs a second of CPU (reconcile runs every few
        seconds)."""
        from offsite.wire.flower_control import FlowerControl

        ca = (self.home.parent / "pki" / "ca.pem").read_bytes()
        client = FlowerControl(self.control, ca)
        try:
            yield client
        except Exception as err:  # httpx, FlowerError, protobuf: all one "the call failed"
            raise FlowerLinkError(f"the SuperLink's Control API refused or failed: {err}") from err
        finally:
            client.close()

    def nodes(self) -> list[ControlNode]:
        """Every node the SuperLink holds, unregistered ones included."""
        with self._control() as control:
            return control.list_nodes()

    def connected(self) -> list[ControlNode]:
        """The nodes connected to this SuperLink: heard from since it started. After a
        restart Flower still counts a node online for up to two heartbeat intervals from
        before it; a round sent to it then fails with "Node Unavailable"."""
        return [n for n in self.nodes() if n.heard_since(self.started_at)]

    def wait_for_nodes(self, count: int, seconds: float, on_wait: Callable[[int], None]) -> None:
        """Return once ``count`` nodes are connected; ``on_wait`` gets each count seen
        before. Raises FlowerLinkError after ``seconds`` with fewer."""
        deadline = time.monotonic() + seconds
        while (seen := len(self.connected())) < count:
            if time.monotonic() >= deadline:
                raise FlowerLinkError(
                    f"only {seen} of the {count} nodes the run needs (federation.num_clients) "
                    f"connected to the SuperLink at {self.address} within {seconds:g} s: start "
                    "the missing nodes (`offsite client start`), or lower "
                    "federation.num_clients, or wait longer (federation.node_wait)"
                )
            on_wait(seen)
            time.sleep(1.0)

    def register(self, public_key: str, name: str) -> str:
        """Admit a SuperNode's authentication key; returns the node id Flower assigned."""
        pem = parse_flower_public_key(public_key)
        with self._control() as control:
            node_id = control.register_node(pem, name)
        if not node_id:
            raise FlowerLinkError(f"the SuperLink did not register node {name}")
        return str(node_id)

    def unregister(self, node_id: str) -> None:
        with self._control() as control:
            control.unregister_node(int(node_id))

    # ------------------------------------------------------------------ the registry leads

    def reconcile(self, store: Store, audit: Audit) -> int:
        """Make the SuperLink admit exactly the enrolled, unrevoked nodes' keys; how many
        changes were made. Failures are logged and retried on the next call."""
        try:
            held = self.nodes()
        except FlowerLinkError as err:
            log.warning("cannot read the SuperLink's nodes (will retry): %s", err)
            return 0
        live = {n.node_id: n for n in held if n.status != UNREGISTERED}
        by_key = {n.public_key: n for n in held}
        changed = 0
        wanted: set[str] = set()
        for key in store.flower_keys():
            try:
                changed += self._reconcile_node(store, audit, key, live, by_key, wanted)
            except (FlowerLinkError, ValueError) as err:
                log.warning("SuperLink registration of %s failed (will retry): %s", key.name, err)
        for node_id, node in live.items():
            if node_id in wanted:
                continue
            try:
                self.unregister(node_id)
            except FlowerLinkError as err:
                log.warning("cannot unregister unknown node %s (will retry): %s", node_id, err)
                continue
            audit.record(
                "superlink-node-removed",
                node_id=node_id,
                superlink_name=node.name or None,
                reason="registered on the SuperLink but not by the registry",
            )
            changed += 1
        return changed

    def _reconcile_node(
        self,
        store: Store,
        audit: Audit,
        key: Any,
        live: dict[str, ControlNode],
        by_key: dict[bytes, ControlNode],
        wanted: set[str],
    ) -> int:
        """One registry node against the SuperLink; 1 if something changed."""
        if not key.active:
            if key.flower_node_id is None:
                return 0
            if key.flower_node_id in live:
                self.unregister(key.flower_node_id)
            store.set_flower_node_id(key.name, None)
            audit.record("superlink-node-unregistered", node=key.name, reason="revoked")
            return 1
        if not key.public_key:
            return 0  # waiting for the node to send a fresh key
        found = by_key.get(parse_flower_public_key(key.public_key))
        if found is not None and found.status != UNREGISTERED:
            wanted.add(found.node_id)
            if found.node_id != key.flower_node_id:
                store.set_flower_node_id(key.name, found.node_id)
                return 1
            return 0
        if found is not None:  # unregistered behind the registry's back: the key is burnt
            store.set_flower_key(key.name, "")
            audit.record(
                "superlink-node-lost",
                node=key.name,
                node_id=found.node_id,
                reason="unregistered on the SuperLink without the registry; Flower never "
                "re-admits that key, the node re-keys when its SuperNode restarts",
            )
            return 1
        node_id = self.register(key.public_key, key.name)
        wanted.add(node_id)
        store.set_flower_node_id(key.name, node_id)
        audit.record("superlink-node-registered", node=key.name, node_id=node_id)
        return 1
