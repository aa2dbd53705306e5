"""Benchmark the operator dashboard: page loads with 1,000 nodes and 100 runs in the registry.

Run: .venv/bin/python bench/dashboard.py [--nodes 1000] [--runs 100] [--repeats 20]

A coordinator registry (SQLite, the default) is filled through the store's own operations:
1,000 enrolled nodes (each with a SuperLink node id) and 100 deployed runs of 5 rounds with 10
client replies per round, every round closed with a checkpoint artifact, plus a bundle artifact
per run; each run's folder holds its rounds log, round verdicts, plan and a ``metrics.json`` with a
five-way table, written through ``RunFolder``. The SuperLink's node table (1,000 rows) is a fixed
list: the live Control API call is cached by the dashboard for 2 s and is not what this measures.

For each page (nodes, runs, one run's detail, artifacts) it measures

- the server: wall time of an HTTP GET over loopback (``httpx``), response fully read;
- the browser: headless Chromium (Debian's, through chromedriver), ``loadEventEnd`` of the
  navigation timing entry: request, HTML parse, CSS, the script, layout;

median and p95 over ``--repeats`` loads after one warm-up each. Target: < 300 ms.
Writes bench/reports/dashboard.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REPORTS = ROOT / "bench" / "reports"
TARGET_MS = 300.0
ROUNDS = 5
CLIENTS = 10


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def fill_registry(state: Path, nodes: int, runs: int) -> tuple[object, list[object]]:
    """A registry with ``nodes`` enrolled nodes and ``runs`` finished runs (see the module
    docstring); returns the store and the SuperLink rows the dashboard is shown."""
    from coordinator.state.folder import RunFolder
    from coordinator.state.plan import RunPlan
    from coordinator.store import open_store
    from offsite.config import OffsiteConfig
    from offsite.wire.flower_control import ControlNode

    store = open_store(state)
    held = []
    for index in range(nodes):
        name = f"site-{index:04d}"
        store.enroll(store.mint_token(), name, f"{index:064x}")
        store.set_flower_node_id(name, str(10_000 + index))
        status = "online" if index % 3 else "offline"
        held.append(ControlNode(str(10_000 + index), status, b"", name, "", ""))
    config = OffsiteConfig().to_dict()
    config["federation"]["rounds"] = ROUNDS
    scores = {
        key: {"metric": "accuracy", "value": value, "count": 150}
        for key, value in (
            ("full_zero_shot", 0.513),
            ("emulator_zero_shot", 0.247),
            ("emulator_fine_tuned", 0.58),
            ("plug_in", 0.74),
            ("full_fine_tuned", 0.92),
        )
    }
    privacy = {
        "middle_tensors": 234,
        "middle_tensors_verbatim": 144,
        "middle_verbatim_fraction": 0.615,
        "full_perplexity": 46.0,
        "emulator_perplexity": 110.3,
        "perplexity_ratio": 2.4,
    }
    for number in range(runs):
        folder = RunFolder.at(state / "runs" / f"run-{number:03d}")
        bundle_digest = f"{number:064x}"
        artifact = f"{number + 5_000_000:064x}"
        folder.save_plan(
            RunPlan(str(folder.path), "", bundle_digest, "", "classification", (), "", artifact)
        )
        store.put_artifact(artifact, "bundle", 200_000_000, folder.path / "bundle.tar")
        run_id = store.create_run(str(folder.path), config, bundle_digest, ROUNDS)
        reports, outcomes = [], []
        for round_number in range(1, ROUNDS + 1):
            round_id = store.open_round(run_id, round_number)
            for client in range(CLIENTS):
                node = (number * CLIENTS + client) % nodes
                reports.append(
                    {
                        "round": round_number,
                        "node-id": 10_000 + node,
                        "num-examples": 100 + client,
                        "partition-id": client,
                        "train-loss": 3.0 / round_number + client * 0.01,
                    }
                )
            outcomes.append({"round": round_number, "outcome": f"aggregated {CLIENTS} updates"})
            digest = f"{number * 100 + round_number + 9_000_000:064x}"
            store.put_artifact(digest, "adapter", 1_302_528, folder.adapter_path(round_number))
            store.add_checkpoint(run_id, round_number, digest)
            store.close_round(round_id, outcomes[-1]["outcome"], digest)
        folder.write_client_reports(reports)
        folder.write_outcomes(outcomes)
        metrics = {
            "run": {"bundle_digest": bundle_digest, "privacy": privacy},
            "scores": scores,
            "training": {"warning": "", "adapter_changed": True},
            "config": config,
        }
        folder.metrics_path.write_text(json.dumps(metrics))
    return store, held


def _browser() -> object:
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


NAVIGATION = (
    "const e = performance.getEntriesByType('navigation')[0];"
    "return [e.responseEnd - e.startTime, e.loadEventEnd - e.startTime, e.transferSize];"
)


def measure(url: str, pages: dict[str, str], repeats: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    driver = _browser()
    try:
        with httpx.Client() as client:
            for page, path in pages.items():
                client.get(url + path)  # warm-up (imports, caches)
                server = []
                size = 0
                for _ in range(repeats):
                    start = time.perf_counter()
                    answer = client.get(url + path)
                    server.append(1000 * (time.perf_counter() - start))
                    assert answer.status_code == 200, (path, answer.status_code)
                    size = len(answer.content)
                driver.get(url + path)  # warm-up
                browser = []
                for _ in range(repeats):
                    driver.get(url + path)
                    _, loaded, _ = driver.execute_script(NAVIGATION)
                    browser.append(float(loaded))
                results[page] = {
                    "bytes": size,
                    "server_median_ms": statistics.median(server),
                    "server_p95_ms": _percentile(server, 0.95),
                    "browser_median_ms": statistics.median(browser),
                    "browser_p95_ms": _percentile(browser, 0.95),
                }
                print(page, {k: round(v, 1) for k, v in results[page].items()}, flush=True)
    finally:
        driver.quit()
    return results


def write_report(results: dict[str, dict[str, float]], info: dict[str, object]) -> None:
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / "dashboard.json").write_text(
        json.dumps({"info": info, "target_ms": TARGET_MS, "pages": results}, indent=1)
    )
    worst = max(max(r["server_p95_ms"], r["browser_p95_ms"]) for r in results.values())
    lines = [
        "# Dashboard page loads",
        "",
        f"{info['nodes']} enrolled nodes and {info['runs']} finished runs ({ROUNDS} rounds × "
        f"{CLIENTS} client replies each, {info['artifacts']} artifacts) in a SQLite registry; "
        f"{info['repeats']} loads per page after a warm-up, on {info['machine']}. "
        "Server: HTTP GET over loopback, body read. Browser: headless Chromium, "
        "navigation start to the load event. The nodes and artifacts pages list 100 rows per "
        "page (their counts, and each node's examples per run, cover every row). "
        "`make bench-dashboard` (bench/dashboard.py).",
        "",
        "| page | HTML | server median | server p95 | browser median | browser p95 |",
        "|---|---|---|---|---|---|",
    ]
    for page, r in results.items():
        lines.append(
            f"| {page} | {r['bytes'] / 1000:.0f} kB | {r['server_median_ms']:.0f} ms | "
            f"{r['server_p95_ms']:.0f} ms | {r['browser_median_ms']:.0f} ms | "
            f"{r['browser_p95_ms']:.0f} ms |"
        )
    verdict = "meets" if worst < TARGET_MS else "misses"
    lines += [
        "",
        f"Worst p95: {worst:.0f} ms — {verdict} the {TARGET_MS:.0f} ms target. Setup (filling "
        f"the registry through the store): {info['setup_seconds']:.0f} s.",
        "",
    ]
    (REPORTS / "dashboard.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    from coordinator.dashboard import CoordinatorSource, DashboardServer
    from coordinator.store.overview import artifact_records, run_records

    with tempfile.TemporaryDirectory(prefix="offsite-bench-dashboard-") as scratch:
        state = Path(scratch) / "coordinator"
        start = time.perf_counter()
        store, held = fill_registry(state, args.nodes, args.runs)
        setup = time.perf_counter() - start
        print(f"registry filled in {setup:.0f} s", flush=True)
        source = CoordinatorSource(
            state, store, superlink=lambda: held, app_key="fpk_bench", bundle_key=b"\0" * 32
        )
        server = DashboardServer(source, "127.0.0.1:0").start()
        try:
            run_id = run_records(store)[0].id
            pages = {
                "nodes": "/nodes",
                "runs": "/runs",
                "run detail": f"/runs/{run_id}",
                "artifacts": "/artifacts",
            }
            results = measure(server.url, pages, args.repeats)
        finally:
            server.stop()
        info = {
            "nodes": args.nodes,
            "runs": args.runs,
            "artifacts": len(artifact_records(store)),
            "repeats": args.repeats,
            "setup_seconds": setup,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
        }
    write_report(results, info)
    print((REPORTS / "dashboard.md").read_text())


if __name__ == "__main__":
    main()
