"""The only door data-owner nodes (and everyone else) have to the SuperLink: nginx, Fleet API only.

Flower 1.41 serves the Fleet API (what SuperNodes call), the Control API (list, register and
unregister nodes, submit runs) and the Runtime API (what the ServerApp calls) on the SuperLink's
one HTTP port, and its only Control API authentication (OIDC accounts) is not in the open-source
distribution. Whoever reaches that port could therefore register a key of their own, kick out
enrolled nodes or submit an app. So the SuperLink listens on loopback only, and the public
SuperLink address is Debian's nginx (a real, hardened TLS proxy, not ours):

- TLS with the coordinator's server certificate, the same chain nodes pinned at enrollment;
- ``POST /v1/fleet/<method>`` for exactly the Fleet methods a SuperNode calls is forwarded to
  the loopback SuperLink (TLS verified against the coordinator CA); every other path and method
  gets 403 before it reaches Flower: ``/v1/control``, ``/v1/runtime``, ``/docs``, anything new;
- each allowed route is an exact ``location =`` (the normalized path must equal it: no prefix,
  suffix or encoding tricks) and passes nginx's ``auth_request`` to the Fleet gate
  (coordinator/service/fleet_gate.py) before any body is read: only a call signed by a key the
  registry admits goes on, so an outsider cannot make the SuperLink buffer request bodies;
- bodies are capped per route (a node's largest messages travel in push-object/push-messages)
  and connections per client address are limited;
- Flower then authenticates the call again itself (``--enable-supernode-auth``: only keys the
  coordinator registered, the node id bound to the key).

Why not mutual TLS with the node certificates our CA issues on this door: ``flower-supernode``
cannot present a client certificate (its HTTP client takes only root certificates; read in
flwr 1.41's ``supercore/protobuf/client.py``), so demanding one would lock every node out.
Flower's per-request node signature authenticates the same enrolled set; the node certificate
keeps guarding our own artifact plane.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from coordinator.service.pki import Pki
from offsite.errors import ExitCode, OffsiteError
from offsite.host.processes import start_child, stop_tree, wait_for_port

# The Fleet API routes a SuperNode with a coordinator-registered key calls in flwr 1.41
# (flwr/superlink/routers/fleet/router.py, supernode/fleet_http_connection.py). Left out:
# register-node and unregister-node, which only self-registering nodes (no auth key) call; a
# method added by a later Flower stays closed until it is listed here.
FLEET_METHODS = (
    "activate-node",
    "deactivate-node",
    "send-node-heartbeat",
    "pull-messages",
    "push-messages",
    "get-run",
    "get-fab",
    "push-object",
    "pull-object",
    "confirm-message-received",
)
# the largest objects a node sends (adapter tensors) go through these; beyond: 413
LARGE_BODY_METHODS = ("push-object", "push-messages")
MAX_LARGE_BODY = "512m"
MAX_BODY = "1m"  # every other Fleet call is a small protobuf
MAX_CONNECTIONS_PER_ADDRESS = 64
GATE_LOCATION = "/_offsite/fleet-auth"


class ProxyError(OffsiteError):
    exit_code = ExitCode.FEDERATION_LINK


def nginx_binary() -> str:
    """Path of the nginx executable, or a ProxyError saying how to install it."""
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise ProxyError(
            "nginx is not installed: the SuperLink's Fleet API is published through it (its "
            "Control API must never be reachable by nodes); install Debian's nginx "
            "(`apt-get install nginx`) or serve with --flower off"
        )
    return found


def _listen(address: str) -> str:
    host, _, port = address.rpartition(":")
    host = host or "0.0.0.0"
    bare_ipv6 = ":" in host and not host.startswith("[")
    return f"[{host}]:{port}" if bare_ipv6 else f"{host}:{port}"


@dataclass(frozen=True)
class FleetProxy:
    """nginx in ``folder``, publishing the Fleet API of ``upstream`` on ``address``."""

    folder: Path
    address: str  # public host:port the nodes use
    upstream: str  # loopback host:port of the SuperLink
    gate_port: int  # loopback port of the Fleet gate (auth_request)

    @property
    def config_path(self) -> Path:
        return self.folder / "nginx.conf"

    @property
    def error_log(self) -> Path:
        return self.folder / "error.log"

    def render(self, pki: Pki) -> str:
        """The nginx configuration (every path absolute, nothing outside ``folder`` written)."""
        folder = self.folder.resolve()
        # As root the workers keep root's rights (the coordinator already has them); as anyone
        # else nginx ignores `user` and runs as that user.
        user = "user root;\n" if os.geteuid() == 0 else ""
        routes = "".join(self._route(pki, method) for method in FLEET_METHODS)
        return f"""# Written by offsite coordinator serve (service/fleet_proxy.py); do not edit.
{user}worker_processes 1;
daemon off;
pid {folder}/nginx.pid;
error_log {self.error_log.resolve()} warn;
events {{ worker_connections 1024; }}
http {{
    access_log {folder}/access.log;
    client_body_temp_path {folder}/tmp/body;
    proxy_temp_path {folder}/tmp/proxy;
    fastcgi_temp_path {folder}/tmp/fastcgi;
    uwsgi_temp_path {folder}/tmp/uwsgi;
    scgi_temp_path {folder}/tmp/scgi;
    server_tokens off;
    limit_conn_zone $binary_remote_addr zone=per_address:1m;
    server {{
        listen {_listen(self.address)} ssl;
        ssl_certificate {pki.server_cert.resolve()};
        ssl_certificate_key {pki.server_key.resolve()};
        ssl_protocols TLSv1.2 TLSv1.3;
        limit_conn per_address {MAX_CONNECTIONS_PER_ADDRESS};
        client_max_body_size {MAX_BODY};
        default_type text/plain;
        location = {GATE_LOCATION} {{
            internal;
            proxy_pass http://127.0.0.1:{self.gate_port}/fleet-auth;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
        }}
{routes}        location / {{
            return 403 "offsite: only the Flower Fleet API is served here\\n";
        }}
    }}
}}
"""

    def _route(self, pki: Pki, method: str) -> str:
        size = MAX_LARGE_BODY if method in LARGE_BODY_METHODS else MAX_BODY
        return f"""        location = /v1/fleet/{method} {{
            limit_except POST {{ deny all; }}
            auth_request {GATE_LOCATION};
            client_max_body_size {size};
            proxy_pass https://{self.upstream};
            proxy_ssl_trusted_certificate {pki.ca_cert.resolve()};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_http_version 1.1;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
"""

    def start(self, pki: Pki, timeout: float = 30.0) -> subprocess.Popen[bytes]:
        """Validate the configuration with ``nginx -t``, start nginx, wait until it listens."""
        binary = nginx_binary()
        (self.folder / "tmp").mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.render(pki))
        command = [binary, "-p", str(self.folder.resolve()), "-c", str(self.config_path.resolve())]
        command += ["-e", str(self.error_log.resolve())]
        checked = subprocess.run([*command, "-t", "-q"], capture_output=True, text=True)
        if checked.returncode != 0:
            raise ProxyError(f"nginx refused its configuration: {_last_line(checked.stderr)}")
        process = start_child(command, dict(os.environ), stdout=subprocess.DEVNULL, stderr=None)
        try:
            wait_for_port(self.address, timeout, process)
        except (ChildProcessError, TimeoutError) as err:
            stop_tree(process)
            raise ProxyError(
                f"nginx did not start on {self.address} ({err}): "
                f"{_last_line(self._log_tail())}; see {self.error_log}"
            ) from err
        return process

    def _log_tail(self) -> str:
        try:
            return self.error_log.read_text(errors="replace")
        except OSError:
            return ""


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"
