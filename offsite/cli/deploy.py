"""``offsite coordinator …`` and ``offsite client …``: onboarding and the artifact plane.

Heavy imports happen inside the commands (``offsite --help`` stays instant).
"""

from __future__ import annotations

import math
import os
import signal
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer

from offsite.errors import ConfigError
from offsite.host.allocator import ALLOCATORS, Allocator
from offsite.host.paths import offsite_home

if TYPE_CHECKING:
    from coordinator.dashboard import DashboardServer
    from coordinator.store import Store

coordinator_app = typer.Typer(
    help="Run the coordinator's service: keys, enrollment tokens, nodes, artifacts.",
    no_args_is_help=True,
)
client_app = typer.Typer(help="Join a coordinator as a data-owner node.", no_args_is_help=True)


@coordinator_app.callback()
@client_app.callback()
def _owner_only_files() -> None:
    """Keys, registries, caches and logs these commands write are readable by their owner only."""
    os.umask(0o077)


MAX_HOURS = 24 * 90  # a token is for one enrollment soon; a quarter is the longest we mint

StateOption = Annotated[
    Path | None,
    typer.Option("--state", help="State folder (default: $OFFSITE_HOME/coordinator)."),
]
DatabaseOption = Annotated[
    str | None,
    typer.Option(
        "--database",
        envvar="OFFSITE_DATABASE_URL",
        help="Registry database URL, e.g. postgresql+psycopg://user:pw@host/offsite "
        "(default: SQLite in the state folder).",
    ),
]
NodeStateOption = Annotated[
    Path | None, typer.Option("--state", help="Node folder (default: $OFFSITE_HOME/node).")
]


def _check_allocator(value: str) -> Allocator:
    """The ``--allocator`` value; an unknown one is refused before the command starts anything."""
    if value not in ALLOCATORS:
        raise typer.BadParameter(f"--allocator must be one of {', '.join(ALLOCATORS)}")
    return cast(Allocator, value)  # one of ALLOCATORS, the Literal's values


def _state(path: Path | None) -> Path:
    return path or offsite_home() / "coordinator"


def _node_state(path: Path | None) -> Path:
    return path or offsite_home() / "node"


def _store(state: Path | None, database: str | None) -> Store:
    from coordinator.store import open_store

    return open_store(database or _state(state))


@coordinator_app.command("init")
def coordinator_init(
    state: StateOption = None,
    database: DatabaseOption = None,
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="Name or IP clients use to reach this coordinator (repeat)."),
    ] = None,
    exist_ok: Annotated[
        bool, typer.Option("--exist-ok", help="Keep existing keys instead of refusing.")
    ] = False,
) -> None:
    """Create the coordinator CA, TLS certificate, bundle-signing key and registry.

    Prints the CA fingerprint: give it to data owners with their token, out of band.
    """
    from coordinator.service.grpc_server import state_paths
    from coordinator.service.pki import init_pki
    from offsite.crypto import fingerprint

    folder = _state(state)
    pki, _ = state_paths(folder)
    if not (exist_ok and pki.exists()):
        init_pki(pki.folder, list(host or []))
    _store(folder, database)
    typer.echo(f"coordinator state: {folder}")
    typer.echo(f"CA fingerprint: {fingerprint(pki.ca_cert.read_bytes())}")


@coordinator_app.command("token")
def coordinator_token(
    state: StateOption = None,
    database: DatabaseOption = None,
    hours: Annotated[
        float, typer.Option(help=f"Validity of the token in hours (0 < hours <= {MAX_HOURS}).")
    ] = 24.0,
) -> None:
    """Mint a one-time enrollment token (stored hashed; shown once)."""
    if not (math.isfinite(hours) and 0 < hours <= MAX_HOURS):
        raise ConfigError(
            f"--hours must be a number in (0, {MAX_HOURS}] (a token valid for {hours} hours "
            "never or always works)"
        )
    typer.echo(_store(state, database).mint_token(timedelta(hours=hours)))


@coordinator_app.command("revoke")
def coordinator_revoke(
    node: Annotated[str, typer.Argument(help="Node name to revoke.")],
    state: StateOption = None,
    database: DatabaseOption = None,
) -> None:
    """Revoke a node: its next call is refused (no restart needed; survives restarts).

    A running `coordinator serve` unregisters its SuperNode key within seconds."""
    from coordinator.service.audit import Audit
    from offsite.errors import OffsiteError

    if not _store(state, database).revoke(node):
        raise OffsiteError(f"no active node named {node!r}; see `offsite coordinator nodes`")
    Audit(_state(state)).record("revoked", node=node)
    typer.echo(f"revoked {node}")


@coordinator_app.command("nodes")
def coordinator_nodes(state: StateOption = None, database: DatabaseOption = None) -> None:
    """List enrolled nodes: registry status, certificate fingerprint and, while `coordinator
    serve` runs, what the SuperLink says of the node (online, offline, registered)."""
    from coordinator.service.flower_link import FlowerLink, FlowerLinkError

    store = _store(state, database)
    try:
        held = {n.node_id: n.status for n in FlowerLink.of_state(_state(state)).nodes()}
    except (FlowerLinkError, OSError):
        held = {}
    keys = {k.name: k.flower_node_id for k in store.flower_keys()}
    for node in store.nodes():
        superlink = held.get(keys.get(node.name) or "", "—") if held else "(not serving)"
        typer.echo(f"{node.name:24} {node.status:8} {superlink:12} {node.fingerprint[:16]}…")


@coordinator_app.command("publish")
def coordinator_publish(
    bundle: Annotated[Path, typer.Argument(help="A bundle folder from `offsite emulator build`.")],
    state: StateOption = None,
    database: DatabaseOption = None,
) -> None:
    """Sign a bundle and make it downloadable; prints the artifact and bundle digests."""
    from coordinator.workflow.deployment import Deployment

    done = Deployment(_state(state), database).publish(bundle)
    typer.echo(f"artifact {done.artifact}  bundle {done.bundle_digest}  ({done.size / 1e6:.1f} MB)")


@coordinator_app.command("serve")
def coordinator_serve(
    state: StateOption = None,
    database: DatabaseOption = None,
    enroll: Annotated[str, typer.Option(help="TLS address for enrollment.")] = "0.0.0.0:9300",
    artifacts: Annotated[
        str, typer.Option(help="Mutual-TLS address for artifacts.")
    ] = "0.0.0.0:9301",
    flower: Annotated[
        str,
        typer.Option(
            help="Address nodes reach the Flower SuperLink's Fleet API on (TLS through nginx; "
            "node authentication); 'off' serves enrollment and artifacts only."
        ),
    ] = "0.0.0.0:9302",
    control: Annotated[
        str,
        typer.Option(
            help="Loopback address of the SuperLink itself (its Control API: this host only)."
        ),
    ] = "127.0.0.1:9303",
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="Plaintext enrollment/artifacts, no SuperLink; refused unless bound to loopback.",
        ),
    ] = False,
    dashboard: Annotated[
        str | None,
        typer.Option(
            "--dashboard",
            help="Also serve the operator dashboard on HOST:PORT (e.g. 127.0.0.1:8480). Beyond "
            "loopback it needs an admin token and is served over TLS with the coordinator's "
            "certificate; without a token it refuses to start (exit 14).",
        ),
    ] = None,
    dashboard_token_file: Annotated[
        Path | None,
        typer.Option(
            "--dashboard-token-file",
            help="File holding the dashboard's admin token (or $OFFSITE_DASHBOARD_TOKEN).",
        ),
    ] = None,
) -> None:
    """Serve enrollment, artifacts and the Flower SuperLink until interrupted.

    Nodes reach the SuperLink's Fleet API only, through nginx on --flower; its Control API
    (list/register/unregister nodes, start runs) stays on --control, loopback. The registry
    leads: enrolled nodes' keys are registered, revoked and unknown ones removed within
    seconds (and on every start); every change goes to <state>/audit.log.
    """
    token = None
    if dashboard is not None:  # refused before anything is imported or listens
        from coordinator.dashboard.server import admin_token, check_binding

        token = admin_token(dashboard_token_file)
        check_binding(dashboard, token)
    from coordinator.service.daemon import CoordinatorDaemon, secure_state
    from coordinator.service.grpc_server import state_paths
    from offsite.errors import OffsiteError

    folder = _state(state)
    pki, _ = state_paths(folder)
    if not pki.exists():
        raise OffsiteError(f"{folder} has no coordinator keys; run `offsite coordinator init`")
    secure_state(folder)
    link = None if insecure or flower == "off" else flower
    store = _store(folder, database)
    daemon = CoordinatorDaemon(folder, store, enroll, artifacts, link, control, insecure)
    built = daemon.start()
    typer.echo(
        f"enrollment on port {built.enroll_port}, artifacts on port {built.artifact_port}"
        + (f", Flower Fleet API on {flower} (SuperLink on {control})" if link else "")
    )
    board = None
    if dashboard is not None:
        try:
            board = _coordinator_dashboard(folder, store, dashboard, token, link is not None)
        except BaseException:
            built.server.stop(grace=1).wait()
            daemon.shutdown()
            raise
        typer.echo(f"dashboard on {board.url}")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: daemon.stop.set())
    daemon.stop.wait()
    if board is not None:
        board.stop()
    built.server.stop(grace=5).wait()
    daemon.shutdown()


def _coordinator_dashboard(
    folder: Path, store: Store, address: str, token: str | None, superlink: bool
) -> DashboardServer:
    """The dashboard over a serving coordinator's registry, SuperLink and keys, started."""
    from datetime import datetime, timezone

    from coordinator.dashboard import CoordinatorSource, DashboardServer
    from coordinator.dashboard.server import split_address
    from coordinator.service.flower_link import FlowerLink
    from coordinator.service.grpc_server import state_paths
    from coordinator.service.pki import app_signer, signing_public_key
    from offsite.host.network import is_loopback_host

    pki, _ = state_paths(folder)
    signed = pki.app_signing_key.is_file()  # made when the SuperLink is first served
    since = (
        datetime.fromtimestamp(pki.app_signing_key.stat().st_mtime, timezone.utc)
        if signed
        else None
    )
    source = CoordinatorSource(
        folder,
        store,
        superlink=FlowerLink.of_state(folder).nodes if superlink else None,
        app_key=app_signer(pki).key_id if signed else "",
        app_key_since=since,
        bundle_key=signing_public_key(pki),
    )
    beyond = not is_loopback_host(split_address(address)[0])
    tls = (pki.server_cert, pki.server_key) if beyond else None
    return DashboardServer(source, address, token, tls).start()


@client_app.command("join")
def client_join(
    coordinator: Annotated[str, typer.Option(help="Coordinator enrollment address HOST:PORT.")],
    ca_fingerprint: Annotated[
        str, typer.Option(help="The CA fingerprint `offsite coordinator init` printed.")
    ],
    name: Annotated[str, typer.Option(help="This node's name ([a-z0-9-], unique).")],
    token: Annotated[
        str | None,
        typer.Option(
            envvar="OFFSITE_ENROLL_TOKEN",
            help="One-time token from `offsite coordinator token` (or $OFFSITE_ENROLL_TOKEN; "
            "prefer --token-file: arguments show in process lists).",
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(help="File holding the token (a mounted secret in compose/Kubernetes)."),
    ] = None,
    state: NodeStateOption = None,
    exist_ok: Annotated[
        bool,
        typer.Option(
            "--exist-ok", help="If this folder already holds an identity, keep it and succeed."
        ),
    ] = False,
) -> None:
    """Enroll this node: make a key here, get a certificate; from then on mutual TLS.

    The coordinator's CA is pinned by --ca-fingerprint and checked to have issued the
    server's certificate before the token is sent. The node also pins the coordinator's
    app-signing key: its SuperNode will run no Flower app that key did not sign.
    """
    from client.identity import NodeIdentity, join

    folder = _node_state(state)
    if exist_ok and NodeIdentity(folder).exists():
        typer.echo(
            f"{folder} already holds the identity of {NodeIdentity(folder).details()['name']}"
        )
        return
    if (token is None) == (token_file is None):
        raise ConfigError("pass the token with exactly one of --token or --token-file")
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read --token-file {token_file}: {err}") from err
    identity = join(coordinator, str(token), ca_fingerprint, name, folder)
    typer.echo(f"joined as {name}; identity in {identity.folder}")
    typer.echo(f"trusting apps signed by {identity.status()['app-signing key']}")


@client_app.command("status")
def client_status(state: NodeStateOption = None) -> None:
    """Show this node's identity and what it trusts (CA, bundle and app signers).

    The app-signing key is the only signer whose Flower apps this node's SuperNode runs;
    compare its fingerprint with the one the coordinator's operator gives you."""
    from client.identity import NodeIdentity

    for key, value in NodeIdentity(_node_state(state)).status().items():
        typer.echo(f"{key + ':':26} {value}")


@client_app.command("start")
def client_start(
    data: Annotated[Path, typer.Option(help="This node's training data (JSONL/CSV/text).")],
    state: NodeStateOption = None,
    port: Annotated[
        int, typer.Option(help="Local port of the SuperNode's ClientApp API (loopback).")
    ] = 9320,
    superlink: Annotated[
        str | None,
        typer.Option(help="SuperLink HOST:PORT (default: the one the coordinator announced)."),
    ] = None,
    memory_budget: Annotated[
        str | None,
        typer.Option(
            "--memory-budget",
            help="Peak memory training may use on this node, e.g. 1.5GB: activation "
            "checkpointing is turned on if that is what fits (`offsite client plan` shows why).",
        ),
    ] = None,
    lora_rank: Annotated[
        int,
        typer.Option(
            "--lora-rank",
            min=0,
            help="This node's LoRA rank in runs with federation.lora_aggregation='merge-exact' "
            "(at most the run's train.lora_r; a low-memory node trains a lower rank, and the "
            "coordinator still aggregates exactly); 0 = the run's rank.",
        ),
    ] = 0,
    allocator: Annotated[
        str,
        typer.Option(
            help="C allocator of the SuperNode and the ClientApps it starts: 'auto' (jemalloc "
            "where installed: ~150 MB lower peak memory for the same speed), 'jemalloc' (fail "
            "without it) or 'system'.",
        ),
    ] = "auto",
) -> None:
    """Run this node's Flower SuperNode until interrupted: it trains when the coordinator runs.

    The data never leaves this machine; the run's bundle is fetched from the coordinator's
    artifact service (mutual TLS, signature and digests verified) into the node's cache.
    """
    import logging

    from client.identity import NodeIdentity
    from client.supernode import run_supernode

    allocator_choice = _check_allocator(allocator)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    identity = NodeIdentity(_node_state(state))
    identity.app_signer()  # refuse to start a node that pins no app signer
    if memory_budget:
        from offsite.host.sizes import parse_size

        try:
            parse_size(memory_budget)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from err
    run_supernode(identity, data, port, superlink, memory_budget, allocator_choice, lora_rank)


@client_app.command("fetch")
def client_fetch(
    artifact: Annotated[str, typer.Argument(help="Artifact digest of the bundle.")],
    bundle: Annotated[str, typer.Argument(help="Bundle (manifest) digest.")],
    state: NodeStateOption = None,
) -> None:
    """Download, verify and cache a signed bundle (resumes an interrupted download)."""
    from tqdm.auto import tqdm

    from client.artifacts import fetch_bundle
    from client.identity import NodeIdentity
    from offsite.digests import require_sha256

    require_sha256(artifact, "artifact digest")
    require_sha256(bundle, "bundle digest")
    identity = NodeIdentity(_node_state(state))
    with tqdm(unit="B", unit_scale=True, desc="bundle") as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        fetched = fetch_bundle(
            identity.channel(),
            artifact,
            bundle,
            identity.folder / "cache",
            identity.signing_key(),
            progress,
        )
    typer.echo(f"bundle {fetched.digest} verified in {fetched.path}")


@client_app.command("plan")
def client_plan(
    bundle: Annotated[Path, typer.Argument(help="A bundle folder (e.g. runs/<run>/bundle).")],
    memory_budget: Annotated[
        str, typer.Option("--memory-budget", help="Peak resident memory allowed, e.g. 1.5GB.")
    ],
    data: Annotated[
        str, typer.Option(help="Local training data the probes train on (catalog name/JSONL).")
    ] = "bbc-news",
    batch_size: Annotated[int, typer.Option(help="Examples per training step.")] = 8,
    max_length: Annotated[int, typer.Option(help="Tokens per example (prompt + answer).")] = 128,
    policies: Annotated[
        str, typer.Option(help="Update policies to consider, in order of preference.")
    ] = "lora,full,sparse,top,bias",
    precisions: Annotated[
        str,
        typer.Option(
            help="Compute precisions to consider, in order of preference. 'auto': the one this "
            "machine computes fastest first (bf16 only where the CPU/GPU has bf16 units; "
            "without them bf16 is smaller but over 10x slower), then the other."
        ),
    ] = "auto",
    checkpointing: Annotated[
        bool, typer.Option(help="Also consider activation checkpointing.")
    ] = True,
    measure: Annotated[
        bool,
        typer.Option(
            help="Train the pick (and, with --measure-all, every candidate) for real "
            "and report measured beside predicted peak memory."
        ),
    ] = True,
    measure_all: Annotated[bool, typer.Option(help="Measure every candidate.")] = False,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the plan as JSON here.")
    ] = None,
    allocator: Annotated[
        str,
        typer.Option(
            help="C allocator the probes run on; keep it the one `offsite client start "
            "--allocator` will use ('auto': jemalloc where installed, or 'system').",
        ),
    ] = "auto",
) -> None:
    """Pick the update policy, precision and checkpointing that fit a memory budget.

    Each candidate is probed with short trainings at two small batch sizes (each twice, in
    fresh processes) and its peak resident memory extrapolated to --batch-size (see
    client/planner.py); the first candidate in preference order that fits is the pick.
    """
    import json

    from tqdm.auto import tqdm

    from client import planner
    from offsite.host.sizes import parse_size

    allocator_choice = _check_allocator(allocator)
    budget = parse_size(memory_budget)
    workload = planner.Workload(
        str(bundle), data, batch_size, max_length, allocator=allocator_choice
    )
    options = planner.candidates(
        [p.strip() for p in policies.split(",") if p.strip()],
        None if precisions == "auto" else [q.strip() for q in precisions.split(",") if q.strip()],
        (False, True) if checkpointing else (False,),
    )
    with tqdm(total=len(options), desc="probing", unit="candidate") as bar:
        estimates, chosen = planner.plan(
            workload,
            options,
            budget,
            measure_pick=measure,
            measure_all=measure_all,
            progress=bar.update,
        )
    mb = 2**20
    typer.echo(f"budget {budget / mb:.0f} MiB, batch {batch_size} x {max_length} tokens")
    typer.echo(f"{'candidate':32} {'predicted':>10} {'measured':>10} {'error':>7}  fits")
    for item in estimates:
        measured = f"{item.measured_peak / mb:.0f}" if item.measured_peak else "—"
        error = f"{item.error:+.1%}" if item.error is not None else "—"
        mark = "yes" if item.predicted_peak <= budget else "no"
        pick_mark = "  <- pick" if item is chosen else ""
        typer.echo(
            f"{item.candidate.label:32} {item.predicted_peak / mb:>9.0f}M {measured:>9}M "
            f"{error:>7}  {mark}{pick_mark}"
        )
    if json_out is not None:
        json_out.write_text(
            json.dumps(
                {
                    "budget": budget,
                    "pick": chosen.candidate.label if chosen else None,
                    "estimates": [e.to_dict() for e in estimates],
                },
                indent=1,
            )
        )
    if chosen is None:
        smallest = min(estimates, key=lambda e: e.predicted_peak)
        typer.echo(
            f"nothing fits {memory_budget}: the smallest candidate ({smallest.candidate.label}) "
            f"needs {smallest.predicted_peak / mb:.0f} MiB; raise the budget or lower "
            "--batch-size / --max-length",
            err=True,
        )
        raise typer.Exit(1)
