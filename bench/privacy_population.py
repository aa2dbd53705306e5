"""Client-level DP at population scale: plug-in accuracy vs clients per round at each ε.

Run: offsite bench privacy-population [--populations 100,300,1000] [--epsilons 8,4,1]
     [--modes frozen-a] [--seeds 1]   (= .venv/bin/python bench/privacy_population.py …)

`bench/reports/privacy.md` measured DP at 4 clients: the noise that hides one client is ~158×
one clipped update at ε = 8 and the adapter is destroyed. The noise on the averaged update
shrinks as 1/n with n clients per round, so this benchmark measures where DP starts to pay off.
Every (population, mode, ε, seed) is one real `offsite simulate` run of the default task
(SmolLM2-135M, bbc-news, the default emulator, 3 rounds) with every client sampled each round,
1 local step per client (a client holds 1,725 / n training examples: ~17 at 100, ~2 at 1,000),
DP-FedAvg at δ = 1e-5 (below 1/n for every population here) with clip 2.0, and the same run
without DP as the reference. Modes: ``frozen-a`` (lora-fa: only B is trained and noised, the
smallest trainable set of the exact modes) and ``merge-exact`` (the noise is added to the dense
ΔW of the adapter blocks' LoRA modules: far more values, so far more noise).

Runs land in bench/out/privacy_population/<population>/<mode>/<eps>/seed-<s>/, finished runs are
reused (it can stop at any time and resume); bench/reports/privacy_population.json is rewritten
after every run and `bench/reports/privacy.md` shows the curve (`make bench-privacy` rewrites
it from both benchmarks). bench/out is not in git: the runs the committed report holds are kept,
and not run again, on a checkout without their run folders (``--fresh`` re-runs them), so the
sweep can be finished over several sessions.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from cells import (
    COMPRESSED_OVERRIDES,
    LORA_MODES,
    committed_report,
    measured_before,
    quiet_setup,
    simulate_cell,
)
from emulator_transfer import mean_ci

from offsite.errors import OffsiteError

ROOT = Path(__file__).resolve().parent
REPORTS = ROOT / "reports"
WORK = ROOT / "out" / "privacy_population"
MODES = {m: LORA_MODES[m] for m in ("frozen-a", "merge-exact")}
COST_POINTS = 3.0  # the bar: DP at ε = 8 costing at most this many points


def overrides(population: int, mode: str, epsilon: float, seed: int) -> list[str]:
    dp = [f"privacy.epsilon={epsilon}", "privacy.delta=1e-5"] if epsilon > 0 else []
    return [
        *COMPRESSED_OVERRIDES,
        *MODES[mode],
        *dp,
        f"federation.num_clients={population}",
        "federation.fraction_train=1.0",
        "train.local_steps=1",
        "eval.full_finetune=false",
        "data.eval_size=500",
        f"seed={seed}",
    ]


def noised_values(run_dir: Path, mode: str) -> int:
    """Values the DP noise lands on: the adapter's tensors but lora-fa's frozen A; under
    merge-exact, the dense ΔW (out x in) of every LoRA module."""
    from safetensors import safe_open

    from coordinator.state.folder import RunFolder
    from offsite.policies import POLICIES

    folder = RunFolder(run_dir)
    rounds = int(folder.config().federation.rounds)
    with safe_open(str(folder.adapter_path(rounds)), "pt") as adapter:
        names = adapter.keys()  # safe_open is not iterable
        shapes = {name: adapter.get_slice(name).get_shape() for name in names}
    if mode == "merge-exact":
        return sum(
            shapes[a.replace(".lora_A.", ".lora_B.")][0] * shape[1]
            for a, shape in shapes.items()
            if ".lora_A." in a
        )
    frozen = POLICIES["lora-fa"].frozen if mode == "frozen-a" else (lambda _name: False)
    return sum(int(math.prod(shape)) for name, shape in shapes.items() if not frozen(name))


def run_row(metrics: dict[str, Any], run_dir: Path, mode: str) -> dict[str, Any]:
    from privacy_matrix import noise_scale

    outcomes = [o for o in metrics.get("outcomes", []) if o.get("round", 0) > 0]
    spent = [o["epsilon"] for o in outcomes if "epsilon" in o]
    return {
        "plug_in": 100 * metrics["scores"]["plug_in"]["value"],
        "full_zs": 100 * metrics["scores"]["full_zero_shot"]["value"],
        "epsilon_spent": spent[-1] if spent else None,
        "failed_rounds": sum(not o["outcome"].startswith("aggregated") for o in outcomes),
        "wall_s": metrics.get("bench_wall_seconds"),
        **noise_scale(metrics, noised_values(run_dir, mode)),
    }


def curve(rows: dict[str, Any]) -> dict[str, Any]:
    """Per mode and ε: plug-in (mean ± CI over seeds) and its cost against no DP at each
    population; the smallest population where ε = 8 costs at most ``COST_POINTS``."""
    out: dict[str, Any] = {}
    for mode, by_population in rows.items():
        table: dict[str, Any] = {}
        for population, by_eps in sorted(by_population.items(), key=lambda kv: int(kv[0])):
            reference = by_eps.get("none", {})
            for eps, seeds in by_eps.items():
                entry = {"plug_in": mean_ci([r["plug_in"] for r in seeds.values()])}
                paired = [
                    reference[s]["plug_in"] - r["plug_in"]
                    for s, r in seeds.items()
                    if s in reference and eps != "none"
                ]
                if paired:
                    entry["cost"] = mean_ci(paired)
                first = next(iter(seeds.values()))
                for key in ("noise_to_update", "noise_multiplier", "trainable_values"):
                    if key in first:
                        entry[key] = first[key]
                table.setdefault(eps, {})[population] = entry
        paying = [
            int(population)
            for population, entry in table.get("8", {}).items()
            if "cost" in entry and entry["cost"]["mean"] <= COST_POINTS
        ]
        out[mode] = {
            "by_epsilon": table,
            "smallest_population_eps8_within_3_points": min(paying) if paying else None,
        }
    return out


def markdown_section(report: dict[str, Any]) -> list[str]:
    """The DP curve's section of bench/reports/privacy.md."""
    lines = [
        "## DP at population scale",
        "",
        f"From `offsite bench privacy-population` (bench/privacy_population.py), written "
        f"{report['written']}: the default task and emulator, every client sampled each round, 1 "
        "local step per client, 3 rounds, δ = 1e-5, clip 2.0, 500 held out; cost = plug-in "
        "without DP − with DP at the same population and seed (mean ± 95 % CI over seeds "
        "when there are several).",
        "",
    ]
    for mode, found in report["curve"].items():
        table = found["by_epsilon"]
        populations = sorted({int(p) for entries in table.values() for p in entries})
        lines += [
            f"### {mode}",
            "",
            "| ε | " + " | ".join(f"{p} clients" for p in populations) + " |",
            "|---|" + "---:|" * len(populations),
        ]
        order = ["none", *sorted((e for e in table if e != "none"), key=float, reverse=True)]
        for eps in order:
            cells = []
            for population in populations:
                entry = table[eps].get(str(population))
                if entry is None:
                    cells.append("–")
                    continue
                text = f"{entry['plug_in']['mean']:.1f}"
                if "cost" in entry:
                    text += f" ({-entry['cost']['mean']:+.1f})"
                if "noise_to_update" in entry:
                    text += f", noise {entry['noise_to_update']:.1f}×"
                cells.append(text)
            label = "no DP" if eps == "none" else eps
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        smallest = found["smallest_population_eps8_within_3_points"]
        lines += [
            "",
            "Plug-in % (in brackets: the change against no DP, points; noise = the averaged "
            "update's noise norm over one clipped update's). **Smallest population where "
            "ε = 8 costs ≤ "
            f"{COST_POINTS:.0f} points: "
            + (f"{smallest} clients per round.**" if smallest else "none of those measured.**"),
            "",
        ]
    lines += ["![plug-in vs clients per round at each ε](privacy_population.png)", ""]
    return lines


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(report["curve"])
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), squeeze=False)
    for axis, mode in zip(axes[0], modes, strict=True):
        for eps, entries in report["curve"][mode]["by_epsilon"].items():
            points = sorted((int(p), e["plug_in"]["mean"]) for p, e in entries.items())
            label = "no DP" if eps == "none" else f"ε = {eps}"
            axis.plot(*zip(*points, strict=True), marker="o", label=label)
        axis.set_xscale("log")
        axis.set_xlabel("clients per round")
        axis.set_ylabel("plug-in accuracy (%)")
        axis.set_title(mode)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--populations", default="100,300,1000")
    parser.add_argument("--epsilons", default="8,4,1", help="Each run also has a no-DP twin.")
    parser.add_argument("--modes", default="frozen-a")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--fresh", action="store_true", help="Re-run finished runs.")
    args = parser.parse_args()
    quiet_setup()
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}; choose from {list(MODES)}")
    epsilons = [0.0, *(float(e) for e in args.epsilons.split(",") if e)]
    rows: dict[str, Any] = committed_report(REPORTS / "privacy_population.json").get("rows", {})
    for population in (int(p) for p in args.populations.split(",") if p):
        for seed in range(args.seeds):
            for mode in modes:
                for epsilon in epsilons:
                    eps = f"{epsilon:g}" if epsilon > 0 else "none"
                    run_dir = WORK / str(population) / mode / eps / f"seed-{seed}"
                    held = str(seed) in rows.get(mode, {}).get(str(population), {}).get(eps, {})
                    if measured_before(held, run_dir, args.fresh):
                        continue  # measured before: its row is in the committed report
                    print(f"== {population} clients, {mode}, ε {eps}, seed {seed}", flush=True)
                    try:
                        metrics = simulate_cell(
                            run_dir, overrides(population, mode, epsilon, seed), args.fresh
                        )
                    except OffsiteError as err:  # one failed run does not end the sweep
                        print(f"   failed: {err}", flush=True)
                        continue
                    by_eps = rows.setdefault(mode, {}).setdefault(str(population), {})
                    by_eps.setdefault(eps, {})[str(seed)] = run_row(metrics, run_dir, mode)
                    report = {
                        "written": time.strftime("%Y-%m-%d %H:%M"),
                        "rows": rows,
                        "curve": curve(rows),
                    }
                    REPORTS.mkdir(parents=True, exist_ok=True)
                    (REPORTS / "privacy_population.json").write_text(json.dumps(report, indent=1))
                    plot(report, REPORTS / "privacy_population.png")
                    _rewrite_privacy_md(report)


def _rewrite_privacy_md(report: dict[str, Any]) -> None:
    """Replace (or append) the population section of bench/reports/privacy.md."""
    path = REPORTS / "privacy.md"
    text = path.read_text() if path.is_file() else "# Privacy options benchmark\n"
    head = text.split("## DP at population scale")[0].rstrip("\n")
    path.write_text(head + "\n\n" + "\n".join(markdown_section(report)))


if __name__ == "__main__":
    main()
