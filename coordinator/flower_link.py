"""The coordinator's Flower SuperLink, run beside the artifact service.

``offsite coordinator serve`` starts ``flower-superlink`` with the coordinator's TLS certificate,
SuperNode authentication on, runtime dependency installation and telemetry off, and its state in
the coordinator's folder (``<state>/flower``). Which SuperNodes may connect follows the registry:
an enrolled node's authentication key is registered with the SuperLink, a revoked node's key is
unregistered (``sync``). ``offsite run`` drives federations through the same folder's ``flwr``
connection (``<state>/flower/config.toml``).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.pki import Pki
from coordinator.store import Store
from offsite.errors import OffsiteError
from offsite.processes import flower_env, start_child, stop_tree, wait_for_port

log = logging.getLogger(__name__)

CONNECTION = "offsite"


class FlowerLinkError(OffsiteError):
    exit_code = 6


@dataclass(frozen=True)
class FlowerLink:
    """The SuperLink of one coordinator state folder."""

    home: Path  # FLWR_HOME of the coordinator side
    address: str  # host:port the SuperLink listens on (Fleet + Control API)

    @classmethod
    def of_state(cls, state: Path, address: str | None = None) -> FlowerLink:
        """The link of ``state``; without ``address``, the one ``serve`` last recorded."""
        home = Path(state).resolve() / "flower"
        if address is None:
            recorded = home / "link.json"
            if not recorded.is_file():
                raise FlowerLinkError(
                    f"{state} has no running Flower SuperLink on record; start it with "
                    "`offsite coordinator serve`"
                )
            address = str(json.loads(recorded.read_text())["address"])
        return cls(home, address)

    @property
    def local_address(self) -> str:
        """Where the coordinator's own ``flwr`` calls reach the SuperLink."""
        host, _, port = self.address.rpartition(":")
        return f"127.0.0.1:{port}" if host in ("", "0.0.0.0", "::", "[::]") else self.address

    def command(self, pki: Pki) -> list[str]:
        host, _, port = self.address.rpartition(":")
        scripts = Path(sys.executable).parent
        return [
            str(scripts / "flower-superlink"),
            "--host",
            host.strip("[]") or "0.0.0.0",
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

    def write_cli_config(self, pki: Pki) -> None:
        """The ``flwr`` connection ``offsite`` used by register/unregister/run."""
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            "[superlink]\n"
            f'default = "{CONNECTION}"\n\n'
            f"[superlink.{CONNECTION}]\n"
            f'address = "{self.local_address}"\n'
            f'root-certificates = "{pki.ca_cert.resolve()}"\n'
        )
        (self.home / "link.json").write_text(json.dumps({"address": self.address}))

    def start(self, pki: Pki, timeout: float = 60.0) -> subprocess.Popen:
        """Start the SuperLink; returns once it accepts connections."""
        self.write_cli_config(pki)
        process = start_child(
            self.command(pki),
            flower_env(self.home),
            cwd=self.home,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(self.local_address, timeout, process)
        except (ChildProcessError, TimeoutError) as err:
            stop_tree(process)
            raise FlowerLinkError(
                f"the Flower SuperLink did not start on {self.address} ({err}); see "
                f"{self.home / 'superlink.log'}"
            ) from err
        return process

    def flwr(self, *args: str, timeout: float = 60.0) -> dict[str, Any]:
        """Run a ``flwr`` CLI command against this SuperLink; its JSON answer."""
        scripts = Path(sys.executable).parent
        result = subprocess.run(
            [str(scripts / "flwr"), *args, CONNECTION, "--format", "json"],
            env=flower_env(self.home),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        try:
            answer = json.loads(result.stdout)
        except json.JSONDecodeError:
            answer = {"success": False, "error-message": (result.stdout + result.stderr)[-400:]}
        if not answer.get("success", False):
            raise FlowerLinkError(
                f"`flwr {' '.join(args)}` failed: {answer.get('error-message', answer)}"
            )
        return answer

    def register(self, public_key: str, name: str) -> str:
        """Allow a SuperNode's authentication key; returns the node id Flower assigned."""
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / f"{name}.pub"
            path.write_text(public_key.strip() + "\n")
            answer = self.flwr("supernode", "register", str(path), "--name", name)
        return str(answer["node-id"])

    def unregister(self, node_id: str) -> None:
        self.flwr("supernode", "unregister", node_id)

    def sync(self, store: Store) -> int:
        """Register active nodes' keys, unregister revoked ones; how many changed.

        Failures are logged and retried on the next call: the registry is the source of truth.
        """
        changed = 0
        for key in store.flower_out_of_sync():
            try:
                if key.active:
                    store.set_flower_node_id(key.name, self.register(key.public_key, key.name))
                    log.info("registered node %s with the SuperLink", key.name)
                else:
                    self.unregister(str(key.flower_node_id))
                    store.set_flower_node_id(key.name, None)
                    log.info("unregistered revoked node %s from the SuperLink", key.name)
                changed += 1
            except (FlowerLinkError, subprocess.TimeoutExpired) as err:
                log.warning("SuperLink registration of %s failed (will retry): %s", key.name, err)
        return changed

    def nodes(self) -> list[dict[str, Any]]:
        return list(self.flwr("supernode", "ls")["nodes"])
