"""Serving the dashboard: where it may bind, with which credentials, in which thread.

On a loopback address it needs nothing (the operator is on the coordinator's host). Anywhere
else it needs an admin token and TLS, and refuses to start without them (``DashboardAuthError``,
exit code 14) before anything listens: the coordinator serves it with its own certificate,
``offsite dashboard`` with the ``--tls-cert`` / ``--tls-key`` it is given, so the token never
crosses the network in clear.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from offsite.errors import ExitCode, OffsiteError
from offsite.host.files import check_token, read_token
from offsite.host.network import is_loopback_host

if TYPE_CHECKING:
    from coordinator.dashboard.reads import Source

TOKEN_ENV = "OFFSITE_DASHBOARD_TOKEN"


class DashboardAuthError(OffsiteError):
    """A dashboard bound beyond loopback without an admin token."""

    exit_code = ExitCode.DASHBOARD_AUTH


def split_address(address: str, option: str = "--dashboard") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) as (host, port); a one-line ``OffsiteError`` otherwise."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise OffsiteError(f"{option} {address!r} is not HOST:PORT (e.g. 127.0.0.1:8480)")
    return host, int(port)


def admin_token(token_file: Path | None) -> str | None:
    """The admin token from ``token_file`` or ``$OFFSITE_DASHBOARD_TOKEN`` (None: none set)."""
    if token_file is not None:
        try:
            return read_token(token_file, "the dashboard token file")
        except ValueError as err:
            raise DashboardAuthError(str(err)) from err
    text = os.environ.get(TOKEN_ENV, "").strip()
    if not text:
        return None
    try:
        return check_token(text, f"${TOKEN_ENV}")
    except ValueError as err:
        raise DashboardAuthError(str(err)) from err


def check_binding(
    address: str,
    token: str | None,
    option: str = "--dashboard",
    token_option: str = "--dashboard-token-file",
    *,
    tls: bool = True,
    tls_options: str = "--tls-cert and --tls-key",
) -> tuple[str, int]:
    """Refuse a dashboard beyond loopback without an admin token or without TLS (``tls``: a
    certificate will be served); (host, port) otherwise. ``option``, ``token_option`` and
    ``tls_options`` name the command's flags in the error."""
    host, port = split_address(address, option)
    if not is_loopback_host(host) and token is None:
        raise DashboardAuthError(
            f"{option} {address} is beyond loopback: set an admin token "
            f"({token_option} FILE or ${TOKEN_ENV}) or bind 127.0.0.1"
        )
    if not is_loopback_host(host) and not tls:
        raise DashboardAuthError(
            f"{option} {address} is beyond loopback, where the admin token would cross the "
            f"network in clear: pass {tls_options} (PEM files) or bind 127.0.0.1"
        )
    return host, port


@dataclass
class DashboardServer:
    """A uvicorn server for one dashboard, in a daemon thread (``start``) or this one (``run``)."""

    source: Source
    address: str
    token: str | None = None
    tls: tuple[Path, Path] | None = None  # (certificate, key) PEM

    def __post_init__(self) -> None:
        import uvicorn

        from coordinator.dashboard.app import build_app

        host, port = check_binding(self.address, self.token, tls=self.tls is not None)
        secure = self.tls is not None
        app = build_app(self.source, self.token, secure=secure)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            ssl_certfile=str(self.tls[0]) if self.tls else None,
            ssl_keyfile=str(self.tls[1]) if self.tls else None,
            lifespan="off",
        )
        self.server = uvicorn.Server(config)
        self.scheme = "https" if secure else "http"
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = split_address(self.address)
        if self.server.started and self.server.servers:
            port = int(self.server.servers[0].sockets[0].getsockname()[1])
        shown = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{shown}:{port}"

    def start(self, timeout: float = 30.0) -> DashboardServer:
        """Serve in a daemon thread; returns once it listens (raises if it could not start)."""
        self._thread = threading.Thread(target=self.server.run, daemon=True, name="dashboard")
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OffsiteError(f"the dashboard could not listen on {self.address}")
            time.sleep(0.05)
        return self

    def run(self) -> None:
        """Serve in this thread until interrupted."""
        self.server.run()

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
