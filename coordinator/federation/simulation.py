"""Run the ServerApp and ClientApp on Flower's simulation engine (Ray backend), in-process.

Why the private ``_run_simulation``: in Flower 1.41 the public ``run_simulation`` is deprecated and
passes an empty ``run_config`` to the apps, while ``flwr run`` leaves a detached SuperLink running
after the run. ``_run_simulation`` is what both use underneath; it takes a real ``Context`` so our
apps read ``run_config["plan"]`` exactly as they do under ``flwr run`` in deployment. Flower is
pinned (==1.41.0) and ``tests/coordinator/test_simulation.py`` runs this path for real.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TypedDict

from offsite.errors import OffsiteError

CLIENT_APP = "client.flower_app:app"
log = logging.getLogger(__name__)


def _serialize_ast_parse() -> None:
    """Work around CPython gh-106905 on 3.11 before 3.11.8 (fixed by gh-113035): two threads
    building ASTs at once share one recursion counter when garbage collection releases the GIL
    mid-construction, and one of them fails with "SystemError: AST constructor recursion depth
    mismatch". Flower's simulation engine validates the ClientApp with ``ast.parse`` in its own
    thread while others run; our suite hit it once in ~660 tests. On those versions every
    ``ast.parse`` in this process takes one lock; later interpreters are left untouched."""
    import ast
    import threading

    if sys.version_info >= (3, 11, 8) or getattr(ast.parse, "_offsite_serialized", False):
        return
    original, lock = ast.parse, threading.RLock()  # re-entrant: a finalizer may parse too

    def parse(*args: object, **kwargs: object) -> object:
        with lock:
            # ast.parse's overloads do not cover a passthrough of *args
            return original(*args, **kwargs)  # type: ignore[call-overload]  # *args passthrough

    parse._offsite_serialized = True  # type: ignore[attr-defined]  # a marker on a function object
    ast.parse = parse  # type: ignore[assignment]  # the same call, serialized; not overloaded


def run_flower_simulation(
    plan_path: Path,
    num_clients: int,
    client_cpus: float,
    total_cpus: int | None = None,
    verbose: bool = False,
) -> None:
    """Run the federated run described by ``plan_path`` with ``num_clients`` virtual nodes."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from coordinator.federation.server_app import app as server_app

    # flwr sets its own logger level on import; its per-round INFO lines would bury our progress.
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.ERROR)
    # Ray workers inherit the environment: keep library advisories out of the progress output.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::UserWarning")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    cpus = total_cpus or os.cpu_count() or 1
    # no dashboard: it is five extra processes whose startup on a busy 2-core machine
    # made Ray's node start time out now and then
    init_args: _RayInitArgs = {
        "num_cpus": cpus,
        "logging_level": "ERROR",
        "log_to_driver": True,
        "include_dashboard": False,
    }
    backend_config = {
        "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
        "init_args": init_args,
    }
    context = Context(
        run_id=0,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={"plan": str(plan_path)},
    )
    try:
        _start_ray(init_args)
        _serialize_ast_parse()
        _run_simulation(
            num_supernodes=num_clients,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            # By reference, as Flower apps name it in pyproject.toml: the coordinator never
            # imports the client package.
            client_app_attr=CLIENT_APP,
            server_app=server_app,
            backend_name="ray",
            # BackendConfig is a dict of dicts; init_args, a TypedDict, is no dict to mypy
            backend_config=backend_config,  # type: ignore[arg-type]  # a TypedDict is not a dict
            server_app_context=context,
        )
    except OffsiteError:
        raise
    except Exception as err:
        raise OffsiteError(
            f"the federated simulation failed: {err}. The run folder keeps the adapters of "
            "every finished round; see the log above for the failing client"
        ) from err
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except ImportError:
            pass


RAY_START_ATTEMPTS = 3


class _RayInitArgs(TypedDict):
    """The ``ray.init`` arguments Flower's Ray backend is configured with."""

    num_cpus: int
    logging_level: str
    log_to_driver: bool
    include_dashboard: bool


def _start_ray(init_args: _RayInitArgs) -> None:
    """Start the local Ray node Flower's backend will use, retrying a start that times out.

    On a busy 2-core machine (or beside a killed run's stray Ray daemons) Ray's node start
    times out now and then; Flower would then fail the whole run. Flower's backend reuses a
    running Ray, so starting it here, with the same worker ``PYTHONPATH`` Flower would pass,
    lets a failed start be retried before any round runs.
    """
    import ray

    if ray.is_initialized():
        return
    paths = [*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])]
    pythonpath = os.pathsep.join(paths)
    os.environ["PYTHONPATH"] = pythonpath
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            ray.init(
                runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
                **init_args,  # type: ignore[arg-type]  # ray's own default logging_level is a str
            )
            return
        except Exception as err:  # Ray raises a bare Exception on a start timeout
            ray.shutdown()
            if attempt == RAY_START_ATTEMPTS:
                raise OffsiteError(
                    f"Ray's local node did not start after {attempt} attempts ({err}); if a "
                    "killed run left Ray daemons behind, stop them with `ray stop` and retry"
                ) from err
            log.warning(
                "Ray's node did not start (%s); retrying (%d/%d)", err, attempt, RAY_START_ATTEMPTS
            )
            time.sleep(2 * attempt)
