"""What one simulated client costs in memory: peak RSS per Ray worker, 1 worker vs several.

Reuses the bundle and data shares of a finished run (``--run``; default: the newest under
``runs/``) and federates one short round of ``--clients`` clients on a local Ray node with
``--workers`` client slots (one CPU each), then reads the client reports: every client names its
worker process (``worker-pid``) and that process's peak resident memory so far
(``worker-peak-rss-mb``). A bundle loaded once per worker shows as one load per process, the
same peak for every client it served, and no growth with the clients a worker trains.

    python bench/worker_memory.py --run runs/<run> --workers 1 2 --clients 4

Writes ``bench/reports/worker_memory.{json,md}`` (rows appended per model and worker count).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPORTS = Path(__file__).resolve().parent / "reports"


def _federate(source: Path, folder: Path, clients: int, workers: int, steps: int) -> float:
    """One round on a fresh local Ray node, in its own process; wall seconds."""
    from coordinator.state.folder import RunFolder
    from coordinator.state.plan import RunPlan
    from offsite.config import config_from_dict, load_config

    plan = RunPlan.load(str(RunFolder(source).plan_path))
    base = load_config(RunFolder(source).config_path).to_dict()
    base["federation"] |= {"num_clients": clients, "rounds": 1, "fraction_train": 1.0}
    base["federation"] |= {"min_replies": 1, "client_cpus": 1.0}
    base["train"] |= {"local_steps": steps}
    config = config_from_dict(base)
    folder.mkdir(parents=True)
    run = RunFolder(folder)
    run.write_config(config)
    plan_path = run.save_plan(dataclasses.replace(plan, run_dir=str(folder)))
    code = (
        "from pathlib import Path; "
        "from coordinator.federation.simulation import RayEngine, run_flower_simulation; "
        f"run_flower_simulation(Path({str(plan_path)!r}), {clients}, "
        f"engine=RayEngine(client_cpus=1.0, total_cpus={workers}))"
    )
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


def measure(source: Path, clients: int, workers: int, steps: int) -> dict[str, Any]:
    from coordinator.state.folder import RunFolder

    with tempfile.TemporaryDirectory(prefix="worker-memory-") as tmp:
        folder = Path(tmp) / "run"
        seconds = _federate(source, folder, clients, workers, steps)
        reports = json.loads(RunFolder(folder).client_reports_path.read_text())
    per_worker: dict[int, list[float]] = defaultdict(list)
    anonymous: list[float] = []
    shared: list[float] = []
    for report in reports:
        if "error" in report:
            raise RuntimeError(f"a client failed: {report['error']}")
        per_worker[int(report["worker-pid"])].append(float(report["worker-peak-rss-mb"]))
        anonymous.append(float(report.get("worker-anon-rss-mb", "nan")))
        shared.append(float(report.get("worker-shared-mb", 0.0)))
    peaks = [max(v) for v in per_worker.values()]
    run = RunFolder(source)
    model = json.loads(run.metrics_path.read_text())["run"]["model"]
    bundle = sum(p.stat().st_size for p in run.bundle_dir.iterdir() if p.is_file())
    return {
        "model": model,
        "bundle_mb": round(bundle / 2**20),
        "workers": workers,
        "clients": clients,
        "processes": len(per_worker),
        "clients_per_process": sorted(len(v) for v in per_worker.values()),
        # a peak that grows client after client in one process would mean per-client state
        "peak_growth_mb": round(max(max(v) - v[0] for v in per_worker.values()), 1),
        "worker_peak_rss_mb": round(max(peaks), 1),
        "worker_peak_rss_mb_mean": round(sum(peaks) / len(peaks), 1),
        # its own memory, without the shared page cache of memory-mapped files
        "worker_anon_rss_mb": round(max(anonymous), 1),
        # frozen tensors each worker maps from the host's one copy (client/shared_frozen.py)
        "worker_shared_mb": round(max(shared), 1),
        "round_s": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, action="append", required=True)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument(
        "--keep", action="store_true", help="keep the report's rows of other models"
    )
    args = parser.parse_args()
    rows = [
        measure(run.resolve(), args.clients, workers, args.steps)
        for run in args.run
        for workers in args.workers
    ]
    path = REPORTS / "worker_memory.json"
    if args.keep and path.is_file():
        models = {r["model"] for r in rows}
        kept = [r for r in json.loads(path.read_text())["rows"] if r["model"] not in models]
        rows = kept + rows
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "worker_memory.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    text = render(rows)
    (REPORTS / "worker_memory.md").write_text(text)
    print(text)


def render(rows: list[dict[str, Any]]) -> str:
    """The Markdown report of ``rows``."""
    lines = [
        "# Memory per simulated client (peak RSS per Ray worker)",
        "",
        "`python bench/worker_memory.py` — one round, one local step per client, one CPU "
        "per worker, on a local Ray node; peak RSS is the worker's high-water mark (loading "
        "and training included), anonymous RSS what it holds of its own after its last "
        "client (without the shared page cache of mapped files).",
        "",
        "| model | bundle MB | workers | clients per worker | worker peak RSS MB (max / mean) "
        "| anonymous RSS MB | shared frozen MB | growth over its clients MB | round s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        anonymous = r.get("worker_anon_rss_mb") or "—"
        shared = r.get("worker_shared_mb", "—")
        lines.append(
            f"| {r['model']} | {r['bundle_mb']} | {r['processes']} | {r['clients_per_process']} "
            f"| {r['worker_peak_rss_mb']} / {r['worker_peak_rss_mb_mean']} "
            f"| {anonymous} | {shared} | {r['peak_growth_mb']} | {r['round_s']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
