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
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offsite.config import FederationConfig
from offsite.errors import ExitCode, OffsiteError
from offsite.host.sizes import parse_size

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


class RayClusterError(OffsiteError):
    """The Ray cluster of ``federation.ray_address`` is unreachable or cannot host a client."""

    exit_code = ExitCode.SIMULATION_ENGINE


@dataclass(frozen=True)
class RayEngine:
    """Where simulated clients run and what each one reserves (``federation.*``).

    An empty ``address`` starts a local Ray node with ``total_cpus`` (default: every core);
    otherwise the simulation joins the running cluster there and ``total_cpus`` is the
    cluster's own. Flower's Ray backend starts one ClientApp actor per slot its nodes have
    CPUs (and GPUs) for, and keeps it for the whole run: the bundle is loaded once per actor.
    """

    address: str = ""
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    client_memory: int = 0  # bytes; 0 = no reservation
    total_cpus: int | None = None

    @classmethod
    def from_config(cls, federation: FederationConfig) -> RayEngine:
        """The engine ``federation`` asks for."""
        memory = parse_size(federation.client_memory) if federation.client_memory else 0
        return cls(
            federation.ray_address,
            federation.client_cpus,
            federation.client_gpus,
            memory,
        )

    def client_resources(self) -> dict[str, float]:
        """Flower's ``client_resources``: passed as they are to each actor's Ray options."""
        resources = {"num_cpus": self.client_cpus, "num_gpus": self.client_gpus}
        if self.client_memory:
            resources["memory"] = float(self.client_memory)
        return resources

    def init_args(self) -> dict[str, Any]:
        """``ray.init`` arguments: a new local node, or the cluster at ``address`` (whose
        resources are its own: Ray refuses ``num_cpus`` when joining one)."""
        # no dashboard: it is five extra processes whose startup on a busy 2-core machine
        # made Ray's node start time out now and then
        common = {"logging_level": "ERROR", "log_to_driver": True, "include_dashboard": False}
        if self.address:
            return {"address": self.address, **common}
        # 'local' even if RAY_ADDRESS is set or `ray start` left a cluster on this machine:
        # an empty address means a node of our own
        cpus = self.total_cpus or os.cpu_count() or 1
        return {"address": "local", "num_cpus": cpus, **common}


def run_flower_simulation(
    plan_path: Path,
    num_clients: int,
    client_cpus: float = 1.0,
    total_cpus: int | None = None,
    verbose: bool = False,
    engine: RayEngine | None = None,
) -> None:
    """Run the federated run described by ``plan_path`` with ``num_clients`` virtual nodes on
    ``engine`` (default: a local Ray node, ``client_cpus`` per client)."""
    engine = engine or RayEngine(client_cpus=client_cpus, total_cpus=total_cpus)
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
    init_args = engine.init_args()
    backend_config = {"client_resources": engine.client_resources(), "init_args": init_args}
    context = Context(
        run_id=0,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={"plan": str(plan_path)},
    )
    try:
        if engine.address:
            _join_cluster(engine, plan_path)
        else:
            _start_ray(init_args)
            _check_capacity(engine, [n["Resources"] for n in _alive_nodes()])
        _serialize_ast_parse()
        _run_simulation(
            num_supernodes=num_clients,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            # By reference, as Flower apps name it in pyproject.toml: the coordinator never
            # imports the client package.
            client_app_attr=CLIENT_APP,
            server_app=server_app,
            backend_name="ray",
            backend_config=backend_config,
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
                ray.shutdown()  # a joined cluster keeps running; only our driver leaves
        except ImportError:
            pass


CONNECT_TIMEOUT = 5.0  # seconds a cluster's head gets to accept a TCP connection


def _join_cluster(engine: RayEngine, plan_path: Path) -> None:
    """Connect to the Ray cluster at ``engine.address`` and check, before any round, that it
    answers, can host a client with the resources asked for, and sees the run folder."""
    import ray

    address = engine.address
    if address != "auto":
        check_reachable(address)
    try:
        ray.init(
            runtime_env={"env_vars": {"PYTHONPATH": _worker_pythonpath()}}, **engine.init_args()
        )
    except Exception as err:  # ray raises ConnectionError, RuntimeError or a bare Exception
        ray.shutdown()
        raise RayClusterError(
            f"could not join the Ray cluster at federation.ray_address={address!r} "
            f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); check that it "
            "runs (`ray status --address ...`) and that this machine runs the same Ray and "
            "Python versions"
        ) from err
    nodes = _alive_nodes()
    _check_capacity(engine, [n["Resources"] for n in nodes])
    _check_shared_folder(plan_path, [str(n["NodeID"]) for n in nodes])


def _alive_nodes() -> list[dict[str, Any]]:
    """The Ray nodes of the connected cluster that are up and offer resources."""
    import ray

    listed: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]  # ray's own
    return [n for n in listed if n.get("Alive") and n.get("Resources")]


def check_reachable(address: str) -> None:
    """Raise ``RayClusterError`` within seconds when nothing listens at ``address`` (Ray
    itself retries a missing head for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as err:
        raise RayClusterError(
            f"no Ray cluster answers at federation.ray_address={address!r} ({err}); start "
            f"one (`ray start --head --port={port}`) or fix the address"
        ) from err


def slots(engine: RayEngine, resources: Mapping[str, float]) -> tuple[int, int]:
    """How many clients a Ray node with ``resources`` hosts: (by CPUs and GPUs, which is what
    Flower sizes its actor pool by; by memory too, which is what Ray will schedule)."""
    by_cpu = int(resources.get("CPU", 0) / engine.client_cpus)
    if engine.client_gpus > 0:
        by_cpu = min(by_cpu, int(resources.get("GPU", 0) / engine.client_gpus))
    if not engine.client_memory:
        return by_cpu, by_cpu
    return by_cpu, min(by_cpu, int(resources.get("memory", 0) // engine.client_memory))


def _check_capacity(engine: RayEngine, nodes: list[Mapping[str, float]]) -> None:
    """Refuse a cluster that cannot host one client, or where the memory reservation would
    leave some of Flower's actors unscheduled (Flower counts CPUs and GPUs only; a message
    sent to an actor Ray never places waits for the round timeout)."""
    fits = [slots(engine, node) for node in nodes]
    if sum(scheduled for _, scheduled in fits) == 0:
        have = ", ".join(
            f"{node.get('CPU', 0):g} CPU / {node.get('GPU', 0):g} GPU / "
            f"{node.get('memory', 0) / 1e9:.1f} GB"
            for node in nodes
        )
        raise RayClusterError(
            f"no node of the Ray cluster ({have or 'none alive'}) can host a client that "
            f"reserves {_describe(engine)}; lower federation.client_cpus, client_gpus or "
            "client_memory, or add nodes"
        )
    for (pooled, scheduled), node in zip(fits, nodes, strict=True):
        if scheduled < pooled:
            raise RayClusterError(
                f"a Ray node with {node.get('CPU', 0):g} CPUs and "
                f"{node.get('memory', 0) / 1e9:.1f} GB fits {pooled} clients by CPU but only "
                f"{scheduled} by federation.client_memory; raise federation.client_cpus so "
                "that CPUs limit clients per node, or lower client_memory"
            )


def _describe(engine: RayEngine) -> str:
    parts = [f"{engine.client_cpus:g} CPU", f"{engine.client_gpus:g} GPU"]
    if engine.client_memory:
        parts.append(f"{engine.client_memory / 1e9:.2f} GB")
    return " / ".join(parts)


def _check_shared_folder(plan_path: Path, node_ids: list[str]) -> None:
    """Every Ray node must read the run folder where the coordinator wrote it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    plan = str(plan_path.resolve())

    @ray.remote(num_cpus=0)
    def sees(path: str) -> bool:  # defined here: shipped by value, needs nothing installed
        return os.path.isfile(path)

    checks = [
        sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
            plan
        )
        for node in node_ids
    ]
    blind = [node for node, ok in zip(node_ids, ray.get(checks), strict=True) if not ok]
    if blind:
        raise RayClusterError(
            f"{len(blind)} of {len(node_ids)} Ray nodes cannot read the run folder "
            f"({Path(plan).parent}); mount it at the same path on every node (a shared "
            "volume; see deploy/kuberay) or point output_dir at one"
        )


def _worker_pythonpath() -> str:
    """This process's import path, for Ray workers (as Flower's backend passes it)."""
    paths = [*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])]
    pythonpath = os.pathsep.join(paths)
    os.environ["PYTHONPATH"] = pythonpath
    return pythonpath


RAY_START_ATTEMPTS = 3


def _start_ray(init_args: dict[str, Any]) -> None:
    """Start the local Ray node Flower's backend will use, retrying a start that times out.

    On a busy 2-core machine (or beside a killed run's stray Ray daemons) Ray's node start
    times out now and then; Flower would then fail the whole run. Flower's backend reuses a
    running Ray, so starting it here, with the same worker ``PYTHONPATH`` Flower would pass,
    lets a failed start be retried before any round runs.
    """
    import ray

    if ray.is_initialized():
        return
    pythonpath = _worker_pythonpath()
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            ray.init(
                runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
                **init_args,
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
