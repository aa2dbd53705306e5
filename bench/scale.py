"""How far one machine's simulation scales: clients per round vs round time and memory.

Run: make bench-scale   (= offsite bench scale = python bench/scale.py)

For each model and each number of clients per round (default 4, 16, 64, 128, 256), one cell
federates ``--rounds`` short rounds (one local step per client, batch 2, ≤ 64 tokens, no
evaluation) on a fresh local Ray node with one client slot per core, every registered client
sampled each round (``--registered`` samples from a larger population instead). Each cell runs
in its own process, the coordinator: Flower's simulation driver, whose ServerApp thread runs the
strategy and the streaming aggregation, and the Ray driver. Measured:

- **round_s**: wall time of the last round (between the global adapters the coordinator saves
  after consecutive rounds: send, train every sampled client, fold the replies, save), so the
  first round's worker start and bundle loading are left out; ``first_round_s`` has them.
- **time_per_client_s**: round_s / clients per round (workers train clients in parallel).
- **coordinator_peak_rss_mb**: the kernel's high-water mark (``VmHWM``) of the coordinator
  process over its whole life: imports, Ray start, the ServerApp's setup (it loads the emulator
  once to initialise the adapter) and every round; Ray's own daemons (GCS, raylet) and the
  client workers are other processes and are not in it. **coordinator_rounds_peak_rss_mb**:
  the high-water mark of the rounds alone (reset with ``/proc/self/clear_refs`` when the setup
  ends), the part that could grow with clients per round; ``coordinator_rounds_start_rss_mb``
  is the resident memory when the rounds start, ``coordinator_start_rss_mb`` before the
  simulation starts.
- **worker_peak_rss_mb**: the highest ``VmHWM`` any Ray worker reported with a client reply
  (``worker-peak-rss-mb``, as in ``bench/worker_memory.py``), ``worker_peak_rss_mb_mean`` the
  mean over the workers; ``workers`` is how many processes trained clients.
- **bytes_per_round**: the adapter tensors sent to and back from every sampled client (dense
  upload; Flower's message framing not counted).

Models: ``tiny`` (the 6-block llama of the tests, built here once into bench/out/scale) and the
default model, whose bundle and data come from a finished run (``--run runs/<run>``; its shares
are pooled and re-split IID over the registered clients). Finished cells are kept in
bench/reports/scale.json and skipped on re-runs (``--fresh`` re-measures); the report
(bench/reports/scale.{json,md,png}) is rewritten after every cell.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
REPORTS = ROOT / "reports"
WORK = ROOT / "out" / "scale"
sys.path.insert(0, str(ROOT.parent))

CLIENTS = (4, 16, 64, 128, 256)
GOALS = {"default_clients_per_round": 128, "coordinator_rss_ratio_256_16": 1.2}
TRAIN: dict[str, dict[str, Any]] = {
    "train": {"local_steps": 1, "batch_size": 2},
    "data": {"max_length": 64},
}


# ---------------------------------------------------------------- the coordinator's process

CELL_CODE = """
import json, sys
from pathlib import Path
import coordinator.federation.server_app as server_app
from client.profile import peak_rss_bytes, reset_peak_rss, rss_bytes
from coordinator.federation.simulation import RayEngine, run_flower_simulation
marks = {"start": rss_bytes()}
initial_adapter_state = server_app.initial_adapter_state

def initial_then_reset(bundle, seed, *args, **kwargs):
    # the ServerApp's setup (it loads the emulator once to initialise the adapter) ends here:
    # keep its high-water mark, then start a new one for the rounds
    state = initial_adapter_state(bundle, seed, *args, **kwargs)
    marks["setup_peak"] = peak_rss_bytes()
    marks["rounds_start"] = rss_bytes()
    marks["reset"] = reset_peak_rss()
    return state

server_app.initial_adapter_state = initial_then_reset
run_flower_simulation(Path(sys.argv[1]), int(sys.argv[2]),
                      engine=RayEngine(client_cpus=1.0, total_cpus=int(sys.argv[3])))
marks["rounds_peak"] = peak_rss_bytes()
print("SCALE-CELL " + json.dumps(marks))
"""


# ---------------------------------------------------------------- the tiny model (built once)


def tiny_source() -> tuple[Path, Path, str]:
    """The tiny model's bundle (built once from the tests' tiny llama), its data pool, its name."""
    bundle = WORK / "tiny-bundle"
    pool = WORK / "tiny-pool.jsonl"
    if (bundle / "manifest.json").is_file() and pool.is_file():
        return bundle, pool, "tiny-llama (tests)"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from coordinator.models import load_full_model
    from emulator.adapter import AdapterSpec
    from emulator.bundle import write_bundle
    from emulator.layers import plan_layers
    from offsite.data import Example, write_jsonl
    from tests.conftest import _CORPUS, LABELS, VOCAB, tiny_model, tiny_texts

    # the tests' tokenizer_dir and tiny_llama_dir fixtures, as files
    corpus = _CORPUS * 4 + [t for label in LABELS for t in tiny_texts(label, 20)]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=VOCAB,
            special_tokens=["<unk>", "<pad>", "<eos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )
    model_dir = WORK / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)  # type: ignore[operator]
    tokenizer.save_pretrained(model_dir)
    model, tok, arch, _ = load_full_model(str(model_dir))
    plan = plan_layers(6, 1, 1, 2)
    spec = AdapterSpec("lora", plan.adapter_layers, 4, 8, arch.lora_targets)
    write_bundle(model, tok, plan, spec, bundle, source="tiny")
    write_jsonl([Example(t, label=lab) for lab in LABELS for t in tiny_texts(lab, 400)], pool)
    return bundle, pool, "tiny-llama (tests)"


# ---------------------------------------------------------------- one cell


def run_cell(
    model: str, source: Path | None, clients: int, registered: int, rounds: int, workers: int
) -> dict[str, Any]:
    """Federate ``rounds`` rounds of ``clients`` sampled out of ``registered``; measure."""
    from coordinator.state.folder import RunFolder
    from coordinator.state.plan import RunPlan
    from emulator.bundle import verify_bundle
    from offsite.config import config_from_dict, load_config

    build_start = time.perf_counter()
    if model == "tiny":
        bundle, pool_path, name = tiny_source()
        lines = pool_path.read_text().splitlines()
        base = load_config(None, ["train.precision='fp32'"]).to_dict()
        task = {
            "task_kind": "classification",
            "labels": ("business", "sport", "tech"),
            "template": "Text: {text}\nTopic:",
        }
        digest = verify_bundle(bundle).digest
    else:
        assert source is not None
        source_plan = RunFolder(source).plan()
        bundle, digest = Path(source_plan.bundle_path), source_plan.bundle_digest
        shares = sorted(Path(source_plan.data_dir).glob("client-*.jsonl"))
        lines = [line for f in shares for line in f.read_text().splitlines() if line.strip()]
        base = RunFolder(source).config().to_dict()
        name = RunFolder(source).metrics()["run"]["model"]
        task = {
            "task_kind": source_plan.task_kind,
            "labels": source_plan.labels,
            "template": source_plan.template,
        }
    build_s = time.perf_counter() - build_start
    base["federation"] |= {
        "num_clients": registered,
        "rounds": rounds,
        "fraction_train": clients / registered,
        "min_replies": 1,
        "client_cpus": 1.0,
        "strategy": "fedavg",
    }
    base["train"] |= TRAIN["train"]
    base["data"] |= TRAIN["data"]
    config = config_from_dict(base)
    assert config.federation.sampled_clients == clients, config.federation.sampled_clients
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        run = RunFolder(Path(tmp) / "run")
        # the pooled examples dealt IID: a seeded shuffle, then every registered-th line
        random.Random(config.seed).shuffle(lines)
        run.data_dir.mkdir(parents=True)
        for index in range(registered):
            share = lines[index::registered]
            if not share:
                raise SystemExit(f"{len(lines)} examples cannot give {registered} clients one each")
            run.client_data(index).write_text("\n".join(share) + "\n")
        run.write_config(config)
        run.save_plan(
            RunPlan(
                run_dir=str(run.path),
                bundle_path=str(bundle),
                bundle_digest=digest,
                data_dir=str(run.data_dir),
                **task,
            )
        )
        start = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                CELL_CODE,
                str(run.plan_path),
                str(registered),
                str(workers),
            ],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT.parent)},
        )
        total_s = time.perf_counter() - start
        line = [x for x in done.stdout.splitlines() if x.startswith("SCALE-CELL ")][-1]
        coordinator = json.loads(line.removeprefix("SCALE-CELL "))
        reports = run.client_reports()
        outcomes = run.outcomes()
        saved = [run.adapter_path(r) for r in range(rounds + 1)]
        times = [p.stat().st_mtime_ns / 1e9 for p in saved]
        adapter_bytes = _tensor_bytes(saved[-1])
    if not coordinator["reset"]:
        raise RuntimeError("the kernel cannot reset the high-water mark (/proc/self/clear_refs)")
    errors = [r["error"] for r in reports if "error" in r]
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed, e.g. {errors[0]}")
    last = [r for r in reports if r["round"] == rounds]
    if len(last) != clients:
        raise RuntimeError(f"round {rounds}: {len(last)} replies for {clients} sampled clients")
    per_worker: dict[int, float] = {}
    for r in reports:
        pid = int(r["worker-pid"])
        per_worker[pid] = max(per_worker.get(pid, 0.0), float(r["worker-peak-rss-mb"]))
    round_s = times[-1] - times[-2]
    return {
        "model": name,
        "clients_per_round": clients,
        "registered_clients": registered,
        "rounds": rounds,
        "workers": len(per_worker),
        "round_s": round(round_s, 2),
        "first_round_s": round(times[1] - times[0], 2),
        "time_per_client_s": round(round_s / clients, 3),
        "run_s": round(total_s, 1),
        "build_s": round(build_s, 1),
        # the process's whole life: max(setup's high-water mark, the rounds')
        "coordinator_peak_rss_mb": _mb(max(coordinator["setup_peak"], coordinator["rounds_peak"])),
        "coordinator_rounds_peak_rss_mb": _mb(coordinator["rounds_peak"]),
        "coordinator_rounds_start_rss_mb": _mb(coordinator["rounds_start"]),
        "coordinator_start_rss_mb": _mb(coordinator["start"]),
        "worker_peak_rss_mb": round(max(per_worker.values()), 1),
        "worker_peak_rss_mb_mean": round(sum(per_worker.values()) / len(per_worker), 1),
        "adapter_bytes": adapter_bytes,
        "bytes_per_round": 2 * clients * adapter_bytes,
        "outcome": outcomes[-1]["outcome"],
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def _mb(size: int) -> float:
    return round(size / 2**20, 1)


def _tensor_bytes(path: Path) -> int:
    """Bytes of the tensors in a safetensors file (what a client receives and sends back)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return sum(f.get_tensor(k).nbytes for k in f.keys())  # noqa: SIM118


# ---------------------------------------------------------------- report


def render(rows: list[dict[str, Any]]) -> str:
    """The Markdown report of ``rows``, with the issue's goals judged."""
    lines = [
        "# Clients per round on one machine",
        "",
        "`offsite bench scale` (bench/scale.py): per cell a fresh local Ray node, one client "
        "slot per core, every sampled client 1 local step (batch 2, ≤ 64 tokens), no "
        "evaluation; round s is the last round's wall time (workers already loaded), "
        "coordinator peak the simulation process's VmHWM (ServerApp, Flower's engine, Ray "
        "driver; not Ray's daemons nor the workers) over its whole life (setup: the ServerApp "
        "loads the emulator once to initialise the adapter) and over the rounds alone (reset "
        "when the setup ends; RSS when the rounds start in brackets), worker peak the highest "
        "VmHWM a Ray worker reported; bytes per round are the adapter tensors down and up. "
        "Load is the machine's 1-minute load average when the cell ended (other work shares "
        "the 2 cores).",
        "",
        "| model | clients per round | registered | workers | round s | s per client "
        "| first round s | coordinator peak RSS MB | coordinator rounds' peak RSS MB (at start) "
        "| worker peak RSS MB (max / mean) | MB per round | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['clients_per_round']} | {r['registered_clients']} "
            f"| {r['workers']} | {r['round_s']} | {r['time_per_client_s']} "
            f"| {r['first_round_s']} | {r['coordinator_peak_rss_mb']} "
            f"| {r['coordinator_rounds_peak_rss_mb']} ({r['coordinator_rounds_start_rss_mb']}) "
            f"| {r['worker_peak_rss_mb']} / {r['worker_peak_rss_mb_mean']} "
            f"| {r['bytes_per_round'] / 1e6:.2f} | {r['load_avg_1m']} |"
        )
    lines += [
        "",
        "Reading the coordinator's memory: the rounds' peak is resident memory, so memory the "
        "process freed after its setup (the default model's emulator, loaded once to "
        "initialise the adapter, leaves the rounds starting near 1 GB) can be reused by the "
        "rounds without raising it; the tiny model has no such slack, and its rounds' peak "
        "is the closer bound on what the coordinator holds per client.",
        "",
        "## Goals",
        "",
    ]
    for model in sorted({r["model"] for r in rows}):
        by = {r["clients_per_round"]: r for r in rows if r["model"] == model}
        if 16 in by and 256 in by:
            for key, what in (
                ("coordinator_peak_rss_mb", "whole process"),
                ("coordinator_rounds_peak_rss_mb", "rounds alone"),
            ):
                ratio = by[256][key] / by[16][key]
                met = "met" if ratio <= GOALS["coordinator_rss_ratio_256_16"] else "missed"
                lines.append(
                    f"- {model}: coordinator peak RSS ({what}) at 256 clients / at 16 = "
                    f"{ratio:.3f} (goal ≤ {GOALS['coordinator_rss_ratio_256_16']}: {met})"
                )
        else:
            lines.append(f"- {model}: coordinator memory goal not judged (needs 16 and 256)")
    default = [r for r in rows if not r["model"].startswith("tiny")]
    most = max((r["clients_per_round"] for r in default), default=0)
    goal = GOALS["default_clients_per_round"]
    lines.append(
        f"- default model: {most} clients per round measured (goal ≥ {goal}: "
        f"{'met' if most >= goal else 'not yet measured' if most == 0 else 'not yet'})"
    )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Round time and coordinator / worker peak RSS against clients per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 5))
    for model in sorted({r["model"] for r in rows}):
        mine = sorted(
            (r for r in rows if r["model"] == model), key=lambda r: r["clients_per_round"]
        )
        x = [r["clients_per_round"] for r in mine]
        left.plot(x, [r["round_s"] for r in mine], marker="o", label=model)
        right.plot(
            x,
            [r["coordinator_peak_rss_mb"] for r in mine],
            marker="o",
            label=f"{model}: coordinator",
        )
        right.plot(
            x,
            [r["coordinator_rounds_peak_rss_mb"] for r in mine],
            marker="^",
            ls=":",
            label=f"{model}: coordinator, rounds",
        )
        right.plot(
            x,
            [r["worker_peak_rss_mb"] for r in mine],
            marker="s",
            ls="--",
            label=f"{model}: worker",
        )
    for ax, title in ((left, "round wall time (s)"), (right, "peak RSS (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("clients per round")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rows: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    REPORTS.mkdir(exist_ok=True)
    rows = sorted(
        rows,
        key=lambda r: (r["model"].startswith("tiny") is False, r["model"], r["clients_per_round"]),
    )
    (REPORTS / "scale.json").write_text(
        json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n"
    )
    (REPORTS / "scale.md").write_text(render(rows))
    plot(rows, REPORTS / "scale.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=["tiny", "default"], choices=["tiny", "default"]
    )
    parser.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS))
    parser.add_argument(
        "--registered",
        type=int,
        default=0,
        help="registered clients (default: = clients per round)",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="client slots (one CPU each)"
    )
    parser.add_argument(
        "--run", type=Path, help="a finished run of the default model (bundle and data)"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="re-measure cells already in the report"
    )
    args = parser.parse_args()
    from coordinator.state.folder import RunFolder

    if args.rounds < 2:
        parser.error("--rounds must be ≥ 2 (the last round is timed, without worker start)")
    path = REPORTS / "scale.json"
    rows: list[dict[str, Any]] = json.loads(path.read_text())["rows"] if path.is_file() else []
    rows = [r for r in rows if "coordinator_rounds_peak_rss_mb" in r]  # older reports re-measured
    settings = {"rounds": args.rounds, "workers": args.workers, "train": TRAIN}
    models = list(args.models)
    if "default" in models and args.run is None:
        runs = sorted(p for p in Path("runs").glob("*") if RunFolder(p).plan_path.is_file())
        if not runs:
            print("default model skipped: no finished run under runs/ (pass --run runs/<run>)")
            models.remove("default")
        else:
            args.run = runs[-1]
    source = args.run.resolve() if args.run else None
    for model in models:
        name = (
            "tiny-llama (tests)" if model == "tiny" else RunFolder(source).metrics()["run"]["model"]  # type: ignore[arg-type]
        )
        for clients in args.clients:
            registered = max(args.registered, clients)
            key = (name, clients, registered)
            if not args.fresh and any(
                (r["model"], r["clients_per_round"], r["registered_clients"]) == key for r in rows
            ):
                print(f"{name} × {clients} clients per round: cached")
                continue
            print(f"{name} × {clients} of {registered} clients ...", flush=True)
            row = run_cell(model, source, clients, registered, args.rounds, args.workers)
            rows = [
                r
                for r in rows
                if (r["model"], r["clients_per_round"], r["registered_clients"]) != key
            ] + [row]
            print(
                f"  round {row['round_s']} s ({row['time_per_client_s']} s per client), "
                f"coordinator peak {row['coordinator_peak_rss_mb']} MB, "
                f"worker peak {row['worker_peak_rss_mb']} MB",
                flush=True,
            )
            write(rows, settings)
    write(rows, settings)
    print((REPORTS / "scale.md").read_text())


if __name__ == "__main__":
    main()
