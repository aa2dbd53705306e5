"""The operator dashboard: nodes, runs, run detail and artifacts in a browser (FastAPI, Jinja2).

Served by ``offsite coordinator serve --dashboard HOST:PORT`` over the coordinator's registry and
by ``offsite dashboard RUNS_DIR`` over simulations; reads go through the store and ``RunFolder``.
Names are imported on first use: ``serve`` checks the binding before loading the pages' modules.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from coordinator.dashboard.app import build_app
    from coordinator.dashboard.reads import Source
    from coordinator.dashboard.server import DashboardAuthError, DashboardServer, admin_token
    from coordinator.dashboard.sources import CoordinatorSource, RunsDirSource

_WHERE = {
    "build_app": "app",
    "CoordinatorSource": "sources",
    "RunsDirSource": "sources",
    "Source": "reads",
    "DashboardAuthError": "server",
    "DashboardServer": "server",
    "admin_token": "server",
}

__all__ = [
    "CoordinatorSource",
    "DashboardAuthError",
    "DashboardServer",
    "RunsDirSource",
    "Source",
    "admin_token",
    "build_app",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"coordinator.dashboard.{_WHERE[name]}"), name)
