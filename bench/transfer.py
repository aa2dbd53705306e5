"""Artifact download vs one Flower message: the same random bytes over loopback, time and memory.

Run: make bench-transfer   (= .venv/bin/python bench/transfer.py [--size-mb 200])

Why it matters: an emulator bundle is hundreds of MB; Flower carries it only inside one protobuf
message, which costs several times the payload in RAM (measured below). Offsite ships bundles
through its own artifact service (streamed ≤ 4 MiB chunks, resumable, mutual TLS) and Flower carries
only `{digest, size}`. Both paths are measured here in one run, side by side, on real processes:

- artifact plane: `offsite coordinator serve` (mutual TLS) and a node process that downloads
  the artifact with `client.artifacts.download` (verified by sha256, fsynced);
- Flower: a TLS SuperLink and one SuperNode; a ServerApp sends one message holding the bytes as
  an ArrayRecord and the ClientApp acknowledges its length. The round trip of a 1-byte message
  (ClientApp start, polling) is measured too and reported separately.

Memory: resident set size sampled every 50 ms over each side's whole process tree (server side:
serve, or SuperLink + SuperExec + ServerApp; node side: downloader, or SuperNode + ClientApp);
the report gives the peak and the idle level before the transfer. Writes
bench/reports/transfer.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from offsite.host.processes import wait_for_port

ROOT = Path(__file__).resolve().parent
REPORTS = ROOT / "reports"
APP = ROOT / "flower_payload"
MB = 1_000_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (0 once it is gone)."""
    try:
        root = psutil.Process(pid)
        members = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


class PeakSampler:
    """Peak summed RSS of named process trees, sampled in a thread."""

    def __init__(self, sides: dict[str, list[int]], period: float = 0.05) -> None:
        self.sides, self.period = sides, period
        self.peak = dict.fromkeys(sides, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> dict[str, int]:
        return {name: sum(tree_rss(p) for p in pids) for name, pids in self.sides.items()}

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, value in self.current().items():
                self.peak[name] = max(self.peak[name], value)
            time.sleep(self.period)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def write_blob(path: Path, size: int) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("wb") as handle:
        left = size
        while left:
            block = os.urandom(min(left, 8 * MB))
            handle.write(block)
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def measure_artifact_plane(work: Path, size: int, env: dict[str, str]) -> dict[str, Any]:
    from client.identity import join
    from coordinator.service.grpc_server import state_paths
    from coordinator.service.pki import init_pki
    from coordinator.store import open_store
    from offsite.crypto import fingerprint

    state = work / "coordinator"
    pki, files = state_paths(state)
    init_pki(pki.folder, ["127.0.0.1"])
    store = open_store(state)
    scratch = files.root / "incoming"
    digest = write_blob(scratch, size)
    os.replace(scratch, files.path(digest))
    store.put_artifact(digest, "blob", size, files.path(digest))
    enroll, artifacts = free_port(), free_port()
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "offsite.cli.main",
            "coordinator",
            "serve",
            "--state",
            str(state),
            "--enroll",
            f"127.0.0.1:{enroll}",
            "--artifacts",
            f"127.0.0.1:{artifacts}",
            "--flower",
            "off",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(f"127.0.0.1:{enroll}", 120.0, serve)
        node = work / "node"
        join(
            f"127.0.0.1:{enroll}",
            store.mint_token(),
            fingerprint(pki.ca_cert.read_bytes()),
            "bench-node",
            node,
        )
        downloader = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import json, sys, time\n"
                "from client.artifacts import download\n"
                "from client.identity import NodeIdentity\n"
                "from offsite.wire.clients import ArtifactClient\n"
                "sys.stdin.readline()\n"
                f"identity = NodeIdentity(__import__('pathlib').Path({str(node)!r}))\n"
                "with identity.channel() as channel:\n"
                "    start = time.perf_counter()\n"
                "    client = ArtifactClient(channel)\n"
                f"    path = download(client, {digest!r}, identity.folder / 'downloads')\n"
                "    print(json.dumps({'seconds': time.perf_counter() - start,"
                " 'received': path.stat().st_size}))\n",
            ],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(3.0)  # let the downloader finish importing before the idle reading
        sampler = PeakSampler({"server": [serve.pid], "node": [downloader.pid]})
        idle = sampler.current()
        with sampler:
            assert downloader.stdin is not None
            downloader.stdin.write("go\n")
            downloader.stdin.flush()
            out, _ = downloader.communicate(timeout=3600)
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        serve.terminate()
        serve.wait(timeout=30)
    return {**result, "idle_rss": idle, "peak_rss": sampler.peak}


def measure_flower_message(work: Path, size: int, env: dict[str, str]) -> dict[str, Any]:
    from coordinator.service.pki import init_pki
    from offsite.host.processes import flower_env, start_child, stop_tree

    pki_dir = work / "flower-pki"
    pki = init_pki(pki_dir, ["127.0.0.1"])
    link_home, node_home = work / "link", work / "supernode"
    link_home.mkdir()
    node_home.mkdir()
    port, node_port = free_port(), free_port()
    scripts = Path(sys.executable).parent
    superlink = start_child(
        [
            str(scripts / "flower-superlink"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--ssl-ca-certfile",
            str(pki.ca_cert),
            "--ssl-certfile",
            str(pki.server_cert),
            "--ssl-keyfile",
            str(pki.server_key),
            "--disable-runtime-dependency-installation",
        ],
        {**flower_env(link_home), **{k: v for k, v in env.items() if k.startswith("PYTHON")}},
        cwd=link_home,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    supernode = None
    try:
        wait_for_port(f"127.0.0.1:{port}", 120.0, superlink)
        supernode = start_child(
            [
                str(scripts / "flower-supernode"),
                "--superlink",
                f"127.0.0.1:{port}",
                "--root-certificates",
                str(pki.ca_cert),
                "--host",
                "127.0.0.1",
                "--port",
                str(node_port),
            ],
            flower_env(node_home),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        (link_home / "config.toml").write_text(
            '[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
            f'address = "127.0.0.1:{port}"\nroot-certificates = "{pki.ca_cert.resolve()}"\n'
        )
        time.sleep(5.0)  # SuperNode connected and idle
        sampler = PeakSampler({"server": [superlink.pid], "node": [supernode.pid]})
        idle = sampler.current()
        out = work / "flower-result.json"
        with sampler:
            streamed = subprocess.run(
                [
                    str(scripts / "flwr"),
                    "run",
                    str(APP),
                    "bench",
                    "--run-config",
                    f'size={size} out="{out}"',
                    "--stream",
                ],
                env=flower_env(link_home),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=3600,
            )
        if not out.is_file():
            tail = "\n".join(streamed.stdout.splitlines()[-20:])
            raise SystemExit(f"the Flower payload run wrote no result:\n{tail}")
        result = json.loads(out.read_text())
    finally:
        if supernode is not None:
            stop_tree(supernode)
        stop_tree(superlink)
    return {**result, "idle_rss": idle, "peak_rss": sampler.peak}


def write_reports(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / "transfer.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    size = meta["size_bytes"]
    artifact, flower = rows
    lines = [
        "# Bundle transfer: artifact service vs one Flower message",
        "",
        f"Generated {meta['finished']} by `python bench/transfer.py --size-mb "
        f"{size / MB:.0f}`: {size / MB:.0f} MB of random bytes over loopback, both over TLS, "
        "one run. RSS = summed resident memory of each side's process tree (peak while "
        "transferring; idle before).",
        "",
        "| path | seconds | MB/s | server peak RSS (idle) MB | node peak RSS (idle) MB |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['path']} | {r['seconds']:.2f} | {size / MB / r['seconds']:.0f} | "
            f"{r['peak_rss']['server'] / MB:.0f} ({r['idle_rss']['server'] / MB:.0f}) | "
            f"{r['peak_rss']['node'] / MB:.0f} ({r['idle_rss']['node'] / MB:.0f}) |"
        )

    def added(r: dict[str, Any]) -> float:  # memory the transfer added over idle, both sides
        return sum(r["peak_rss"][s] - r["idle_rss"][s] for s in ("server", "node"))

    net = flower["seconds"] - flower["empty_seconds"]
    net_ratio = (
        f"{net / artifact['seconds']:.1f}× after subtracting Flower's fixed round-trip cost"
        if net > 0
        else "the payload's own cost is within the noise of Flower's fixed round-trip cost"
    )
    lines += [
        "",
        f"Flower's 1-byte round trip (ClientApp start, polling; faster of one before and one "
        f"after) took {flower['empty_seconds']:.2f} s; the payload message "
        f"{flower['seconds']:.2f} s. Artifact download: "
        f"{flower['seconds'] / artifact['seconds']:.1f}× faster than the Flower message "
        f"({net_ratio}); memory added over idle on both "
        f"sides: {added(artifact) / MB:.0f} MB vs {added(flower) / MB:.0f} MB "
        f"({added(flower) / max(added(artifact), 1):.1f}×).",
        "",
        "![time and peak memory](transfer.png)",
        "",
    ]
    (REPORTS / "transfer.md").write_text("\n".join(lines))
    plot(rows, REPORTS / "transfer.png")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["path"] for r in rows]
    left.bar(names, [r["seconds"] for r in rows], color=["tab:green", "tab:red"])
    left.set_ylabel("seconds")
    left.set_title("transfer time")
    width = 0.35
    x = range(len(rows))
    for offset, side, color in (
        (-width / 2, "server", "tab:blue"),
        (width / 2, "node", "tab:orange"),
    ):
        right.bar(
            [i + offset for i in x],
            [r["peak_rss"][side] / MB for r in rows],
            width,
            label=f"{side} peak",
            color=color,
        )
        right.bar(
            [i + offset for i in x],
            [r["idle_rss"][side] / MB for r in rows],
            width,
            color="lightgrey",
            label=f"{side} idle" if side == "node" else "idle",
        )
    right.set_xticks(list(x), names)
    right.set_ylabel("resident memory (MB)")
    right.set_title("peak RSS per side")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=200.0, help="Payload size in MB.")
    args = parser.parse_args()
    size = int(args.size_mb * MB)
    env = dict(os.environ)
    env.update(FLWR_TELEMETRY_ENABLED="0", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory(prefix="offsite-transfer-") as scratch:
        work = Path(scratch)
        print("artifact service …", flush=True)
        artifact = measure_artifact_plane(work, size, env)
        print(f"  {artifact['seconds']:.2f} s", flush=True)
        print("Flower message …", flush=True)
        flower = measure_flower_message(work, size, env)
        print(f"  {flower['seconds']:.2f} s", flush=True)
    for result in (artifact, flower):
        if result["received"] != size:
            raise SystemExit(f"received {result['received']} bytes, sent {size}")
    rows = [
        {"path": "artifact service (chunked stream)", **artifact},
        {"path": "one Flower message", **flower},
    ]
    write_reports(rows, {"finished": time.strftime("%Y-%m-%d %H:%M"), "size_bytes": size})
    print((REPORTS / "transfer.md").read_text())


if __name__ == "__main__":
    main()
