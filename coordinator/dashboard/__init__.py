"""The operator dashboard: nodes, runs, run detail and artifacts in a browser (FastAPI, Jinja2).

Served by ``offsite coordinator serve --dashboard HOST:PORT`` over the coordinator's registry and
by ``offsite dashboard RUNS_DIR`` over simulations; reads go through the store and ``RunFolder``.
"""

from coordinator.dashboard.app import build_app
from coordinator.dashboard.reads import CoordinatorSource, RunsDirSource, Source
from coordinator.dashboard.server import DashboardAuthError, DashboardServer, admin_token

__all__ = [
    "CoordinatorSource",
    "DashboardAuthError",
    "DashboardServer",
    "RunsDirSource",
    "Source",
    "admin_token",
    "build_app",
]
