"""A real deployment on 127.0.0.1: coordinator and two data-owner nodes as separate processes.

init → two one-time tokens → two joins (client keys made on the node, CA and app signer pinned)
→ `coordinator serve` (enrollment TLS, artifacts mutual TLS, the Flower SuperLink on loopback
behind nginx, which publishes only its Fleet API) → two `client start` SuperNodes on their own
data, running only apps the coordinator signed → `offsite run` for 2 rounds on a tiny model:
the nodes download and verify the signed bundle, train, and the coordinator stores the result.

The attack of an outsider holding only the public ca.pem (list, register, unregister nodes,
submit an app whose ClientApp reads the node's data) is refused at every step, and nodes refuse
an unsigned app and one signed by a foreign key even when the coordinator's own SuperLink
offers it: no byte of a node's data leaves the node. The registry leads the SuperLink: a rogue
registration is removed, a node unregistered behind its back re-keys and is back online.
SIGKILL of the whole coordinator mid-run, restart, `offsite run --resume`: the run completes
and equals an uninterrupted one. A revoked node is unregistered from the SuperLink.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coordinator.store import open_store
from offsite.data import Example, write_jsonl
from offsite.errors import ExitCode
from offsite.host.processes import flower_env, wait_for_port
from tests.conftest import LABELS, tiny_texts

pytestmark = pytest.mark.integration
CANARY = "CANARY-7f3c1e9a-never-leaves-the-node"  # in every node's data, nowhere else


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.running = env, logs, []

    def offsite(self, *args: str, timeout: float = 120.0) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "offsite.cli.main", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, f"offsite {' '.join(args)}:\n{result.stdout}{result.stderr}"
        return result.stdout

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", "offsite.cli.main", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.running.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.running):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.running:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


@dataclass
class Deployment:
    root: Path
    state: Path
    model: Path
    processes: Processes
    enroll: int
    artifacts: int
    flower: int
    control: int
    ca: str
    server: subprocess.Popen | None = None
    serve_args: tuple[str, ...] = ()  # more `coordinator serve` options (e.g. --dashboard)

    def serve(self) -> None:
        self.server = self.processes.start(
            "coordinator",
            "coordinator",
            "serve",
            "--state",
            str(self.state),
            "--enroll",
            f"127.0.0.1:{self.enroll}",
            "--artifacts",
            f"127.0.0.1:{self.artifacts}",
            "--flower",
            f"127.0.0.1:{self.flower}",
            "--control",
            f"127.0.0.1:{self.control}",
            *self.serve_args,
        )
        wait_for_port(f"127.0.0.1:{self.enroll}", 90.0, self.server)
        wait_for_port(f"127.0.0.1:{self.flower}", 90.0, self.server)

    def join_and_start(self, name: str, seed: int) -> Path:
        data = self.root / f"{name}.jsonl"
        rows = [Example(t, label=lab) for lab in LABELS for t in tiny_texts(lab, 12, seed=seed)]
        rows.append(Example(f"{CANARY} private record of {name}", label=LABELS[0]))
        write_jsonl(rows, data)
        token = self.processes.offsite("coordinator", "token", "--state", str(self.state)).strip()
        node = self.root / name
        (self.root / f"{name}.token").write_text(token + "\n")
        self.processes.offsite(
            "client",
            "join",
            "--coordinator",
            f"127.0.0.1:{self.enroll}",
            "--token-file",
            str(self.root / f"{name}.token"),
            "--ca-fingerprint",
            self.ca,
            "--name",
            name,
            "--state",
            str(node),
        )
        self.processes.start(
            name,
            "client",
            "start",
            "--state",
            str(node),
            "--data",
            str(data),
            "--port",
            str(_free_port()),
        )
        return node

    def run_args(self, rounds: int, run_dir: Path) -> list[str]:
        return [
            "run",
            "--state",
            str(self.state),
            "--run-dir",
            str(run_dir),
            f"model.name='{self.model}'",
            f"data.name='{self.root / 'eval.jsonl'}'",
            "data.eval_size=10",
            "data.max_length=48",
            "emulator.bottom=1",
            "emulator.top=1",
            "emulator.keep=2",
            "federation.num_clients=2",
            f"federation.rounds={rounds}",
            "federation.round_timeout=300",
            "train.local_steps=2",
            "train.batch_size=4",
            "train.precision='fp32'",
        ]


@contextmanager
def running_deployment(
    root: Path, tokenizer, serve_args: tuple[str, ...] = ()
) -> Iterator[Deployment]:
    """init → serve → two one-time tokens → two joins → two SuperNodes on their own data;
    everything is stopped on exit."""
    from tests.conftest import tiny_model

    model = root / "tiny-llama"
    tiny_model("llama").save_pretrained(model)
    tokenizer.save_pretrained(model)
    write_jsonl(
        [Example(t, label=lab) for lab in LABELS for t in tiny_texts(lab, 8, seed=9)],
        root / "eval.jsonl",
    )
    env = dict(os.environ)
    env.update(
        OFFSITE_HOME=str(root / "home"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        HF_HUB_OFFLINE="1",
        PYTHONWARNINGS="ignore",
    )
    (root / "logs").mkdir()
    processes = Processes(env, root / "logs")
    state = root / "coordinator"
    try:
        printed = processes.offsite(
            "coordinator", "init", "--state", str(state), "--host", "127.0.0.1"
        )
        ca = printed.split("CA fingerprint:")[1].strip()
        ports = [_free_port() for _ in range(4)]
        found = Deployment(root, state, model, processes, *ports, ca, serve_args=serve_args)
        found.serve()
        for index, name in enumerate(("site-a", "site-b")):
            found.join_and_start(name, seed=index)
        yield found
    finally:
        processes.stop_all()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Iterator[Deployment]:
    """init → serve → two one-time tokens → two joins → two SuperNodes on their own data."""
    with running_deployment(tmp_path_factory.mktemp("deployment"), tokenizer) as found:
        yield found


def _adapter(run: Path, round_number: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapters" / f"round-{round_number}.safetensors"))


def test_coordinator_and_two_nodes_federate_over_mtls_and_node_auth(
    deployment: Deployment,
) -> None:
    run = deployment.root / "runs" / "first"
    output = deployment.processes.offsite(*deployment.run_args(2, run), timeout=900)
    assert (run / "adapters" / "round-2.safetensors").is_file(), output
    assert (run / "report.md").is_file()
    assert (run / "flower.log").read_text().strip()  # Flower's own log, kept with the run
    rounds = json.loads((run / "rounds.json").read_text())
    per_round = {r["round"]: {int(r["partition-id"]) for r in rounds} for r in rounds}
    assert sorted(per_round) == [1, 2]
    assert all(len(nodes) == 2 for nodes in per_round.values()), per_round
    metrics = json.loads((run / "metrics.json").read_text())
    assert "federated training (Flower deployment)" in metrics["timings"]
    # no fifth row: the coordinator holds no client data to fine-tune the full model on
    assert "full_fine_tuned" not in metrics["scores"] and len(metrics["scores"]) == 4
    assert "skipped" in metrics["notes"]["full fine-tuning baseline"]
    outcomes = json.loads((run / "outcomes.json").read_text())
    assert [o["round"] for o in outcomes if o["round"] > 0] == [1, 2]
    assert not (run / "data").exists(), "a deployment run must not hold client data"
    # one registry per coordinator: the run's rounds are in the coordinator's, none in the run
    assert not (run / "registry").exists()
    store = open_store(deployment.state)
    run_id = store.run_id(str(run.resolve()))
    assert run_id is not None and store.last_closed_round(run_id) == 2
    # each node fetched and verified the signed bundle into its own cache
    digest = metrics["run"]["bundle_digest"]
    for name in ("site-a", "site-b"):
        node = deployment.root / name
        assert (node / "cache" / "bundles" / digest / "manifest.sig").is_file()
        details = json.loads((node / "node.json").read_text())
        assert details["superlink"] == f"127.0.0.1:{deployment.flower}"
        assert oct((node / "flower.key").stat().st_mode & 0o777) == "0o600"
    # the coordinator's state (registry, SuperLink database, artifacts, apps) and the run's files
    # are owner-only: no group or world bit on any of them
    exposed = [
        f"{path} {oct(path.stat().st_mode & 0o777)}"
        for folder in (deployment.state, run)
        for path in folder.rglob("*")
        if not path.is_symlink() and path.stat().st_mode & 0o077
    ]
    assert not exposed, exposed
    assert any(p.suffix == ".db" for p in deployment.state.rglob("*")), "no database was checked"


def test_each_node_supernode_allocates_with_jemalloc(deployment: Deployment) -> None:
    """`offsite client start` preloads jemalloc (the ClientApps inherit the SuperNode's env)."""
    import psutil

    from offsite.host.allocator import active_allocator

    def command(child: psutil.Process) -> list[str]:
        try:
            return child.cmdline()
        except psutil.Error:  # a ClientApp that finished (zombie until reaped)
            return []

    supernodes = [
        child
        for process in deployment.processes.running
        if process.poll() is None
        for child in psutil.Process(process.pid).children(recursive=True)
        if any("flower-supernode" in part for part in command(child))
    ]
    assert len(supernodes) == 2, [c.cmdline() for c in supernodes]
    assert [active_allocator(c.pid) for c in supernodes] == ["jemalloc", "jemalloc"]
    assert all("libjemalloc" in c.environ().get("LD_PRELOAD", "") for c in supernodes)


EVIL_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "an app that tries to read a data owner's data"
license = "Apache-2.0"
dependencies = ["flwr>=1.41.0"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "{publisher}"

[tool.flwr.app.components]
serverapp = "evil_app.server:app"
clientapp = "evil_app.client:app"

[tool.flwr.app.config]
out = ""
canary = ""
"""
EVIL_SERVER = """\
import json
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context) -> None:
    nodes = list(grid.get_node_ids())
    asks = [
        Message(RecordDict({"ask": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="query")
        for n in nodes
    ]
    replies = []
    for reply in grid.send_and_receive(asks, timeout=90):
        if reply.has_error():
            replies.append({"error": str(reply.error)})
        else:
            replies.append({"content": dict(reply.content["loot"])})
    out = Path(str(context.run_config["out"]))
    out.write_text(json.dumps({"nodes": nodes, "replies": replies}))
"""
EVIL_CLIENT = """\
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def steal(msg, context):
    Path(str(context.run_config["canary"])).write_text("the evil ClientApp ran")
    data = Path(str(context.node_config["data-path"])).read_text()
    return Message(RecordDict({"loot": ConfigRecord({"data": data})}), reply_to=msg)
"""


def _evil_app(folder: Path, name: str = "evil-app", publisher: str = "mallory") -> Path:
    (folder / "evil_app").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(EVIL_PYPROJECT.format(name=name, publisher=publisher))
    (folder / "evil_app" / "__init__.py").write_text("")
    (folder / "evil_app" / "server.py").write_text(EVIL_SERVER)
    (folder / "evil_app" / "client.py").write_text(EVIL_CLIENT)
    return folder


def _flwr(home: Path, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess:
    env = flower_env(home)
    return subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _outsider(deployment: Deployment) -> Path:
    """A FLWR_HOME holding only the public ca.pem and the public SuperLink address."""
    home = deployment.root / "outsider"
    if not home.exists():
        home.mkdir()
        shutil.copy(deployment.state / "pki" / "ca.pem", home / "ca.pem")
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "out"\n\n[superlink.out]\n'
            f'address = "127.0.0.1:{deployment.flower}"\n'
            f'root-certificates = "{home / "ca.pem"}"\n'
        )
    return home


def _online(deployment: Deployment) -> dict[str, str]:
    from coordinator.service.flower_link import FlowerLink

    link = FlowerLink.of_state(deployment.state)
    return {n.node_id: n.status for n in link.nodes() if n.status != "unregistered"}


def _wait_online(deployment: Deployment, count: int, seconds: float = 90.0) -> dict[str, str]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = _online(deployment)
        if list(found.values()).count("online") >= count:
            return found
        time.sleep(1.0)
    return _online(deployment)


def _assert_no_data_left_the_nodes(deployment: Deployment) -> None:
    """The canary in every node's data appears nowhere on the coordinator's side."""
    node_folders = {deployment.root / n for n in ("site-a", "site-b", "site-c")}
    places = [deployment.state, deployment.root / "runs", deployment.root / "logs"]
    places += [deployment.root / "outsider", deployment.root / "evil-out"]
    for place in places:
        for path in place.rglob("*") if place.exists() else []:
            if path.is_file() and not any(f in path.parents for f in node_folders):
                assert CANARY.encode() not in path.read_bytes(), f"node data reached {path}"


def test_an_outsider_with_only_ca_pem_can_list_register_unregister_and_run_nothing(
    deployment: Deployment,
) -> None:
    import httpx
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    before = _wait_online(deployment, 2)
    assert list(before.values()).count("online") == 2, before
    home = _outsider(deployment)
    listed = _flwr(home, "supernode", "ls", "out", "--format", "json")
    assert '"success": false' in listed.stdout and "403" in listed.stdout, listed.stdout
    assert not any(node_id in listed.stdout for node_id in before)

    rogue = ec.generate_private_key(ec.SECP384R1())
    (home / "rogue.pub").write_bytes(
        rogue.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    registered = _flwr(home, "supernode", "register", str(home / "rogue.pub"), "out")
    assert registered.returncode != 0 and "403" in registered.stdout + registered.stderr
    for node_id in before:
        kicked = _flwr(home, "supernode", "unregister", node_id, "out")
        assert kicked.returncode != 0 and "403" in kicked.stdout + kicked.stderr
    canary = deployment.root / "evil-ran"
    app = _evil_app(deployment.root / "outsider-app")
    submitted = _flwr(
        home,
        "run",
        str(app),
        "out",
        "--run-config",
        f'out="{deployment.root / "evil-out"}" canary="{canary}"',
    )
    assert submitted.returncode != 0 and "403" in submitted.stdout + submitted.stderr

    # the proxy forwards nothing but the Fleet API's POST methods
    ca = str(home / "ca.pem")
    with httpx.Client(base_url=f"https://127.0.0.1:{deployment.flower}", verify=ca) as web:
        for method, path in [
            ("POST", "/v1/control/list-nodes"),
            ("POST", "/v1/control/start-run"),
            ("POST", "/v1/runtime/pull-messages"),
            ("GET", "/docs"),
            ("GET", "/openapi.json"),
            ("GET", "/v1/fleet/get-run"),
            ("POST", "/v1/fleet/register-node"),
            ("POST", "/v1/fleet/unregister-node"),
            ("POST", "/v1/fleet/../control/list-nodes"),
            ("POST", "/v1/fleet/get-run/../../control/list-nodes"),
        ]:
            answer = web.request(method, path, content=b"")
            assert answer.status_code == 403, (method, path, answer.status_code)
    assert _online(deployment) == before  # nobody was added or removed
    assert not canary.exists()
    _assert_no_data_left_the_nodes(deployment)


def _superlink_rss(deployment: Deployment) -> int:
    import psutil

    assert deployment.server is not None
    for child in psutil.Process(deployment.server.pid).children(recursive=True):
        if any("flower-superlink" in part for part in child.cmdline()):
            return int(child.memory_info().rss)
    raise AssertionError("no flower-superlink process")


def test_unsigned_fleet_calls_never_reach_the_superlink_with_a_body(
    deployment: Deployment,
) -> None:
    """Flower reads a Fleet body before it checks the signature: the proxy's gate must refuse
    unsigned calls from their headers, and cap bodies per route."""
    import httpx

    home = _outsider(deployment)
    url = f"https://127.0.0.1:{deployment.flower}"
    before = _superlink_rss(deployment)
    chunk = os.urandom(1 << 20)

    def body(megabytes: int):
        for _ in range(megabytes):
            yield chunk

    with httpx.Client(base_url=url, verify=str(home / "ca.pem"), timeout=60) as web:
        for _ in range(4):
            try:
                answer = web.post("/v1/fleet/push-object", content=body(100))
                assert answer.status_code == 401, answer.status_code
            except httpx.TransportError:
                pass  # nginx answered 401 and closed before the upload ended
        small_route = web.post("/v1/fleet/get-run", content=b"x" * (2 << 20))
        assert small_route.status_code == 413
        assert web.post("/v1/fleet/get-run", content=b"").status_code == 401
        assert web.post("/v1/fleet/get-run%0a", content=b"").status_code == 403
    assert _superlink_rss(deployment) - before < 50 * 2**20
    assert list(_wait_online(deployment, 2).values()).count("online") == 2


def test_nodes_run_no_unsigned_or_foreign_signed_app_and_keep_their_data(
    deployment: Deployment,
) -> None:
    """Even offered by the coordinator's own SuperLink (its loopback Control API), an app the
    coordinator's app key did not sign never runs on a node."""
    import json as json_
    from dataclasses import replace

    from flwr.cli.build import build_fab_from_disk

    from coordinator.service.app_registry import apps_folder, file_app
    from coordinator.service.pki import Pki, app_signer, init_pki

    assert list(_wait_online(deployment, 2).values()).count("online") == 2
    home = deployment.state / "flower"  # the coordinator's own flwr connection (loopback)
    canary = deployment.root / "evil-ran"
    out = deployment.root / "evil-out"
    config = f'out="{out}" canary="{canary}"'
    unsigned = _evil_app(deployment.root / "unsigned-app")
    result = _flwr(home, "run", str(unsigned), "offsite", "--run-config", config, "--stream")
    assert out.is_file(), result.stdout + result.stderr
    answer = json_.loads(out.read_text())
    assert len(answer["replies"]) == 2, answer
    assert all("could not be verified" in r.get("error", "") for r in answer["replies"]), answer
    assert not canary.exists(), "an unsigned ClientApp ran on a node"

    # a FAB signed by a foreign key, filed under the coordinator's own key id: Flower's check on
    # the node verifies the signature with the pinned key and refuses it
    out.unlink()
    foreign = init_pki(deployment.root / "foreign-pki", ["localhost"])
    fab = build_fab_from_disk(_evil_app(deployment.root / "foreign-app", "foreign-app", "offsite"))
    app = file_app(deployment.state, fab, foreign)
    ours = app_signer(Pki(deployment.state / "pki")).key_id
    assert app.key_id != ours
    entry = apps_folder(deployment.state) / "offsite--foreign-app--1.0.0.json"
    entry.write_text(json_.dumps(replace(app, key_id=ours).__dict__))
    result = _flwr(home, "run", app.spec, "offsite", "--run-config", config, "--stream")
    assert out.is_file(), result.stdout + result.stderr
    answer = json_.loads(out.read_text())
    assert len(answer["replies"]) == 2, answer
    assert all("could not be verified" in r.get("error", "") for r in answer["replies"]), answer
    assert not canary.exists(), "a foreign-signed ClientApp ran on a node"
    _assert_no_data_left_the_nodes(deployment)

    # and the coordinator's genuine, signed app still runs its rounds on both nodes
    run = deployment.root / "runs" / "after-attack"
    deployment.processes.offsite(*deployment.run_args(1, run), timeout=900)
    rounds = json_.loads((run / "rounds.json").read_text())
    assert {int(r["partition-id"]) for r in rounds if r["round"] == 1}.__len__() == 2
    _assert_no_data_left_the_nodes(deployment)


def test_the_registry_leads_the_superlink_and_a_dropped_node_rekeys(
    deployment: Deployment,
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from coordinator.service.audit import Audit
    from coordinator.service.flower_link import FlowerLink
    from coordinator.store import open_store

    before = _wait_online(deployment, 2)
    link = FlowerLink.of_state(deployment.state)
    # a registration behind the registry's back (the loopback Control API) is removed
    rogue = ec.generate_private_key(ec.SECP384R1()).public_key()
    rogue_ssh = rogue.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
    rogue_id = link.register(rogue_ssh, "rogue")
    deadline = time.monotonic() + 30
    while rogue_id in _online(deployment) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert rogue_id not in _online(deployment)
    # an enrolled node unregistered behind its back comes back with a fresh key
    keys = {k.name: k for k in open_store(deployment.state).flower_keys()}
    site_a = keys["site-a"]
    assert site_a.flower_node_id in before
    link.unregister(str(site_a.flower_node_id))
    deadline = time.monotonic() + 120
    renewed = site_a
    while time.monotonic() < deadline:
        renewed = {k.name: k for k in open_store(deployment.state).flower_keys()}["site-a"]
        fresh = renewed.flower_node_id not in (None, site_a.flower_node_id)
        if fresh and _online(deployment).get(str(renewed.flower_node_id)) == "online":
            break
        time.sleep(1.0)
    assert renewed.public_key != site_a.public_key
    assert _online(deployment).get(str(renewed.flower_node_id)) == "online"
    events = [(e["event"], e.get("node")) for e in Audit(deployment.state).entries()]
    assert ("superlink-node-removed", None) in events
    assert ("superlink-node-lost", "site-a") in events
    assert ("flower-key-renewed", "site-a") in events
    # state files are readable by their owner only
    for path in [
        deployment.state / "registry.db",
        deployment.state / "audit.log",
        deployment.state / "flower" / "superlink.db",
        *(deployment.state / "artifacts").iterdir(),
        *(deployment.state / "pki").glob("*.key"),
    ]:
        assert path.stat().st_mode & 0o077 == 0, f"{path} is {oct(path.stat().st_mode)}"


def test_a_second_coordinator_on_the_same_ports_fails_and_the_first_keeps_serving(
    deployment: Deployment,
) -> None:
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "offsite.cli.main",
            "coordinator",
            "serve",
            "--state",
            str(deployment.state),
            "--enroll",
            f"127.0.0.1:{deployment.enroll}",
            "--artifacts",
            f"127.0.0.1:{deployment.artifacts}",
            "--flower",
            f"127.0.0.1:{deployment.flower}",
            "--control",
            f"127.0.0.1:{deployment.control}",
        ],
        env=deployment.processes.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode != 0
    assert "address in use" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    assert list(_wait_online(deployment, 2).values()).count("online") == 2


def test_a_run_needing_more_nodes_than_are_connected_stops_with_the_count(
    deployment: Deployment,
) -> None:
    """Two nodes are connected; a run that needs three waits federation.node_wait seconds,
    then stops with one line and the SuperLink's exit code instead of waiting forever."""
    run = deployment.root / "runs" / "too-few-nodes"
    args = [*deployment.run_args(1, run), "federation.num_clients=3", "federation.node_wait=2"]
    result = subprocess.run(
        [sys.executable, "-m", "offsite.cli.main", *args],
        env=deployment.processes.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == ExitCode.FEDERATION_LINK, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "only 2 of the 3 nodes" in errors[0] and "offsite client start" in errors[0]
    assert not (run / "adapters" / "round-1.safetensors").exists()


def test_a_killed_coordinator_resumes_the_deployed_run_and_matches_an_uninterrupted_one(
    deployment: Deployment,
) -> None:
    reference = deployment.root / "runs" / "reference"
    deployment.processes.offsite(*deployment.run_args(3, reference), timeout=900)

    killed = deployment.root / "runs" / "killed"
    runner = deployment.processes.start("killed-run", *deployment.run_args(3, killed))
    marker = killed / "adapters" / "round-2.safetensors"
    deadline = time.monotonic() + 600
    while not marker.is_file() and time.monotonic() < deadline and runner.poll() is None:
        time.sleep(0.2)
    assert marker.is_file(), "round 2 never finished"
    time.sleep(0.5)
    assert deployment.server is not None
    os.killpg(deployment.server.pid, signal.SIGKILL)  # serve, SuperLink, SuperExec, ServerApp
    runner.wait(timeout=120)
    assert not (killed / "report.md").exists(), "the run finished before it could be killed"

    deployment.serve()  # same state folder and ports; the SuperNodes reconnect
    # at once: the run waits for both nodes to reach the new SuperLink (Flower still counts
    # them online from before the kill, and a round sent then fails "Node Unavailable")
    deployment.processes.offsite(
        "run", "--state", str(deployment.state), "--resume", str(killed), timeout=900
    )
    resumed = [r for r in json.loads((killed / "rounds.json").read_text()) if r["round"] == 3]
    assert not [r for r in resumed if "error" in r], resumed
    outcomes = json.loads((killed / "outcomes.json").read_text())
    assert [o["round"] for o in outcomes if o["round"] > 0] == [1, 2, 3]
    # the same nodes (by their stable partition) trained each round in both runs
    assert _replies_per_round(killed) == _replies_per_round(reference)
    final, expected = _adapter(killed, 3), _adapter(reference, 3)
    assert final.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=0, atol=1e-6)


def _replies_per_round(run_dir: Path) -> dict[int, list[tuple[int, int]]]:
    """Round -> sorted (partition, examples) of the replies it aggregated (a resumed run may
    also log a stale reply to the killed run's instruction, quarantined: not aggregated)."""
    per_round: dict[int, list[tuple[int, int]]] = {}
    for reply in json.loads((run_dir / "rounds.json").read_text()):
        if "quarantined" in reply or "error" in reply:
            continue
        entry = (int(reply["partition-id"]), int(reply["num-examples"]))
        per_round.setdefault(int(reply["round"]), []).append(entry)
    return {number: sorted(entries) for number, entries in sorted(per_round.items())}


def test_a_revoked_node_is_unregistered_and_its_node_stops_with_the_reason(
    deployment: Deployment,
) -> None:
    from coordinator.service.audit import Audit
    from coordinator.store import open_store

    deployment.join_and_start("site-c", seed=5)
    node = deployment.processes.running[-1]
    assert list(_wait_online(deployment, 3).values()).count("online") == 3, _online(deployment)
    status = deployment.processes.offsite(
        "client", "status", "--state", str(deployment.root / "site-c")
    )
    assert "app-signing key:" in status and "SHA256:" in status and "fpk_" in status
    deployment.processes.offsite(
        "coordinator", "revoke", "site-c", "--state", str(deployment.state)
    )
    deadline = time.monotonic() + 60
    keys = {k.name: k for k in open_store(deployment.state).flower_keys()}
    while keys["site-c"].flower_node_id is not None and time.monotonic() < deadline:
        time.sleep(1.0)
        keys = {k.name: k for k in open_store(deployment.state).flower_keys()}
    assert keys["site-c"].flower_node_id is None
    assert list(_online(deployment).values()).count("online") == 2, _online(deployment)
    # its SuperNode was dropped; asking to re-key, the node learns it was revoked and stops
    assert node.wait(timeout=120) == ExitCode.ENROLLMENT  # revoked
    log = (deployment.processes.logs / "site-c.log").read_text()
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "revoked" in errors[0], log[-800:]
    events = [(e["event"], e.get("node")) for e in Audit(deployment.state).entries()]
    assert ("revoked", "site-c") in events
    assert ("superlink-node-unregistered", "site-c") in events
