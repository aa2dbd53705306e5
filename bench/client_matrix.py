"""Benchmark the data owner's client against full-model fine-tuning, side by side.

Run: make bench-client   (= offsite bench client = .venv/bin/python bench/client_matrix.py)

Two models: the embedded default (SmolLM2-135M, 30 blocks, emulator 2-16-2) and a deeper
synthetic one (SmolLM2's shapes with 48 blocks, random weights, emulator 2-16-2). On each, in
one run and on the same batches (bbc-news, the default recipe: 8 examples × ≤ 128 tokens,
AdamW, answer-only loss):

- **baselines**: full-model full fine-tuning in fp32 and in bf16 autocast, full-model LoRA;
- **the offsite client**: every update policy × {fp32, bf16, int8, int4} on the default 2-16-2
  emulator (int8 and int4 bundles are quantized by the owner with AWQ; the client computes in
  bf16 on the packed kernels of ``client.kernels``), and LoRA × {bf16, int8} on smaller
  emulators (SMALL_SHAPES: bottom-keep-top blocks). The small emulators' accuracy runs select their
  middle blocks by cosine and distill them (``emulator.selection=cosine``,
  ``emulator.distill=true``); their throughput bundles are the same shapes undistilled (speed
  and memory depend on shapes only).

Each cell runs in a fresh process (nothing shared, no allocator reuse between cells): load, then
``--warmup`` discarded steps and ``--steps`` measured ones. Throughput is answer-loss training
tokens per second; memory is the process's peak RSS over the training steps (kernel high-water mark,
reset after loading). Full fine-tuning runs in fp32 and bf16, trimming the C heap after every step,
in bf16 without trimming (faster, higher peak) and in bf16 on jemalloc (``offsite.host.allocator``);
speed-ups are against the fastest of them and memory ratios against the lowest peak. Offsite cells
train as a client does: lean runtime, saved activations in ``client.kernels.arena``, no trimming,
jemalloc where installed.

Plug-in accuracy (default model only: the synthetic model's weights are random) comes from a
real ``offsite simulate`` run of the default federation per policy × precision; cells finished in
bench/out/client are reused (``--fresh`` re-runs). The report
(bench/reports/client.{json,md,png}) is rewritten after every cell.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
REPORTS = ROOT / "reports"
WORK = ROOT / "out" / "client"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from cells import COMPRESSED_OVERRIDES, placement  # noqa: E402 -- after the path setup

POLICIES = ("lora", "lora-top", "top", "sparse", "full", "bias")
Shape = tuple[int, int, int]  # emulator (bottom adapter blocks, middle blocks kept, top ones)
# The smaller emulators (distilled, LoRA plug-in: 2-4-2 46.0 % and 1-6-1 45.3 %, too lossy).
SMALL_SHAPES: tuple[Shape, ...] = ((2, 8, 2), (2, 6, 2))
SMALL_POLICIES = ("lora",)
SMALL_PRECISIONS = ("bf16", "int8")
DEFAULT_SHAPE: Shape = (2, 16, 2)  # the default emulator (EmulatorConfig's bottom, keep, top)
# The layer-drop shapes are built pinned to a plain layer drop (cells.LAYER_DROP_OVERRIDES) at
# the precision the cell names; one LoRA cell trains on the default, depth-preserving compressed
# emulator (cells.COMPRESSED_OVERRIDES: every middle block kept, fisher-svd, int8).
# 2-26-2 until 2026-12-07 (its row stays in the report); read from the overrides, not restated
COMPRESSED_SHAPE: Shape = placement(COMPRESSED_OVERRIDES, blocks=30)
COMPRESSED_CELL = f"offsite {'-'.join(map(str, COMPRESSED_SHAPE))} fisher-svd lora int8"
PRECISIONS = ("fp32", "bf16", "int8", "int4")
MODELS = {
    "smollm2-135m (30 blocks)": {"key": "default", "blocks": 30},
    "synthetic (48 blocks)": {"key": "deep48", "blocks": 48},
}
BASELINES = ("full FT fp32", "full FT bf16", "full FT bf16 no-trim", "full FT bf16 jemalloc")
ACCURACY_TOLERANCE = 1.0  # points below the LoRA default a policy may lose
GOALS = {"speedup": 6.5, "memory": 5.6}


# ---------------------------------------------------------------- one cell, in its own process


def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the cell's model, train ``warmup + steps`` steps, measure (runs in a subprocess).

    Each kind imports what its own process needs before the runtime's memory is read: the
    baselines transformers' modeling and PEFT, the client its lean runtime (``client.runtime``;
    transformers only for a family that runtime does not cover).
    """
    if spec["kind"] != "offsite":
        import peft  # noqa: F401
        import transformers.models.llama.modeling_llama  # noqa: F401
    import torch

    from client.profile import measure_training, rss_bytes
    from client.session import load_client_tokenizer, load_for_training, training_memory
    from emulator.adapter import AdaptedModel, AdapterSpec, attach_adapter
    from emulator.arch import arch_spec, block_list, block_prefix
    from emulator.bundle import verify_bundle
    from emulator.examples import training_batches
    from offsite.config import OffsiteConfig
    from offsite.data import load_task, split_holdout
    from offsite.host.allocator import active_allocator
    from offsite.policies import POLICIES as POLICY_TABLE

    rss_imports = rss_bytes()
    torch.manual_seed(0)
    defaults = OffsiteConfig()
    device = torch.device("cpu")
    precision = "bf16" if spec["precision"] in ("bf16", "int8", "int4") else "fp32"
    converted: dict[str, int] = {}
    if spec["kind"] == "offsite":
        bundle = verify_bundle(spec["bundle"])
        adapted, converted = load_for_training(bundle, precision, policy=spec["policy"])
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(spec["model_path"])
        arch = arch_spec(config)
        model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
        layers = tuple(range(int(config.num_hidden_layers)))
        identity = {i: i for i in layers}
        if spec["kind"] == "full-lora":
            adapted = attach_adapter(model, arch, AdapterSpec("lora", layers), identity)
        else:
            model.requires_grad_(True)
            blocks = block_list(model, arch)
            adapted = AdaptedModel(
                model,
                AdapterSpec("full", layers),
                arch,
                block_prefix(model, arch, blocks),
                identity,
            )
    if spec["kind"] == "offsite":
        tokenizer = load_client_tokenizer(bundle)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    task = load_task(defaults.data.name)
    train, _ = split_holdout(task.examples, defaults.data.eval_size, defaults.seed)
    batches = training_batches(
        tokenizer,
        train,
        task.template or defaults.data.template,
        max_words=defaults.data.max_words,
        max_length=defaults.data.max_length,
        batch_size=defaults.train.batch_size,
        seed=0,
    )
    trainable = sum(p.numel() for p in adapted.trainable_parameters())
    rss_loaded = rss_bytes()
    if spec["kind"] == "offsite":  # as a client trains (client.session.training_memory)
        memory = training_memory(adapted, checkpointing=False, device=device)
        memory_mode = "arena"
    else:  # full fine-tuning as people run it: with or without trimming the heap every step
        memory = {"trim_memory": spec.get("trim", True)}
        memory_mode = "trim" if memory["trim_memory"] else "keep"
    measured = measure_training(
        adapted,
        batches,
        steps=spec["steps"],
        warmup=spec["warmup"],
        lr=POLICY_TABLE[spec.get("policy", "full" if spec["kind"] == "full-ft" else "lora")].lr,
        precision=precision,
        device=device,
        **memory,
    )
    return {
        **spec,
        "compute": precision,
        "trainable_parameters": trainable,
        "rss_imports": rss_imports,
        "rss_loaded": rss_loaded,
        **measured.to_dict(),
        "threads": torch.get_num_threads(),
        "runtime": "lean" if converted.get("lean_runtime") else "transformers",
        "memory_mode": memory_mode,
        "allocator": active_allocator(),
    }


def median_row(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from repeated runs of a cell: the median tokens/s and the median peak RSS (upper
    median for an even count), every run's numbers kept under ``runs``."""

    def median(key: str) -> Any:
        values = sorted(r[key] for r in results)
        return values[len(values) // 2]

    row = dict(results[0])
    row["tokens_per_second"] = median("tokens_per_second")
    row["peak_rss"] = median("peak_rss")
    row["runs"] = [
        {"tokens_per_second": r["tokens_per_second"], "peak_rss": r["peak_rss"]} for r in results
    ]
    return row


def cell_in_subprocess(spec: dict[str, Any]) -> dict[str, Any]:
    from offsite.host.allocator import allocator_env

    command = [sys.executable, str(Path(__file__).resolve()), "cell", json.dumps(spec)]
    env = allocator_env(os.environ, spec.get("allocator", "system"))
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"cell {spec['name']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- models and bundles


def synthetic_model(blocks: int, source: Path, out: Path) -> Path:
    """SmolLM2's config with ``blocks`` decoder blocks, seeded random weights, its tokenizer."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(source)
    config.num_hidden_layers = blocks
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = out.with_suffix(".partial")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    tmp.rename(out)
    return out


def shape_label(shape: Shape) -> str:
    return "-".join(str(n) for n in shape)


def shape_suffix(shape: Shape) -> str:
    """Folder-name part of a shape's bundles and distillation ('' for the default; 2-k-2
    shapes keep their first name, 'keep<k>', so bundles built before are reused)."""
    if shape == DEFAULT_SHAPE:
        return ""
    bottom, keep, top = shape
    return f"keep{keep}" if (bottom, top) == DEFAULT_SHAPE[::2] else shape_label(shape)


def ensure_bundle(
    model_path: Path,
    quantize: str,
    out: Path,
    shape: Shape = DEFAULT_SHAPE,
    compressed: bool = False,
) -> Path:
    """The model's emulator bundle of ``shape`` (fp32 or owner-quantized layer drop), or with
    ``compressed`` the depth-preserving compressed emulator (``shape`` gives bottom and top),
    built once."""
    if (out / "manifest.json").is_file():
        return out
    from cells import COMPRESSED_OVERRIDES, LAYER_DROP_OVERRIDES

    from coordinator.models import load_full_model
    from emulator.adapter import AdapterSpec
    from emulator.build import build_bundle
    from emulator.layers import plan_layers
    from offsite.config import load_config

    full, tokenizer, arch, _ = load_full_model(str(model_path))
    bottom, keep, top = shape
    emulator = (
        list(COMPRESSED_OVERRIDES)
        if compressed
        else [*LAYER_DROP_OVERRIDES, f"emulator.keep={keep}", f"emulator.quantize='{quantize}'"]
    )
    settings = load_config(
        None, [f"emulator.bottom={bottom}", f"emulator.top={top}", *emulator]
    ).emulator
    blocks = int(full.config.num_hidden_layers)
    plan = plan_layers(blocks, settings.bottom, settings.top, settings.keep)
    adapter = AdapterSpec.for_plan("lora", plan, arch)
    build_bundle(
        full, tokenizer, arch, plan, adapter, out, source=str(model_path), settings=settings
    )
    return out


# ---------------------------------------------------------------- the grid


def throughput_specs(
    model_path: Path, bundles: dict[str, Path], args: Any, compressed: Path | None = None
) -> list[dict]:
    """Every throughput cell of one model; ``compressed`` is the compressed emulator's bundle
    folder (the embedded model only)."""
    common = {"model_path": str(model_path), "tokenizer": str(model_path)}
    common |= {"steps": args.steps, "warmup": args.warmup}
    specs = [
        {**common, "name": "full FT fp32", "kind": "full-ft", "precision": "fp32"},
        {**common, "name": "full FT bf16", "kind": "full-ft", "precision": "bf16"},
        {
            **common,
            "name": "full FT bf16 no-trim",
            "kind": "full-ft",
            "precision": "bf16",
            "trim": False,
        },
        {
            **common,
            "name": "full FT bf16 jemalloc",
            "kind": "full-ft",
            "precision": "bf16",
            "trim": False,  # malloc_trim is glibc's: nothing to trim under jemalloc
            "allocator": "jemalloc",
        },
        {**common, "name": "full LoRA bf16", "kind": "full-lora", "precision": "bf16"},
    ]
    for shape, policy, precision in offsite_grid():
        bundle = bundles[shape, bundle_precision(precision)]
        specs.append(
            {
                **common,
                "name": cell_name(shape, policy, precision),
                "kind": "offsite",
                "policy": policy,
                "precision": precision,
                "emulator": shape_label(shape),
                "shape": list(shape),
                "bundle": str(bundle),
                "allocator": "auto",  # as a node's SuperNode starts its ClientApps
            }
        )
    if compressed is not None:
        specs.append(
            {
                **common,
                "name": COMPRESSED_CELL,
                "kind": "offsite",
                "policy": "lora",
                "precision": "int8",
                "emulator": shape_label(COMPRESSED_SHAPE),
                "shape": list(COMPRESSED_SHAPE),
                "compressed": True,
                "bundle": str(compressed),
                "allocator": "auto",
            }
        )
    return specs


def offsite_grid() -> list[tuple[Shape, str, str]]:
    """(emulator shape, policy, precision) of every offsite throughput cell."""
    grid = [(DEFAULT_SHAPE, policy, q) for policy in POLICIES for q in PRECISIONS]
    small = [(s, p, q) for s in SMALL_SHAPES for p in SMALL_POLICIES for q in SMALL_PRECISIONS]
    return grid + small


def bundle_precision(precision: str) -> str:
    """The bundle a compute precision trains on: fp32 and bf16 share the float one."""
    return "fp32" if precision in ("fp32", "bf16") else precision


def cell_name(shape: Shape, policy: str, precision: str) -> str:
    """'offsite lora bf16' on the default emulator, 'offsite 2-4-2 lora bf16' on another."""
    label = "" if shape == DEFAULT_SHAPE else f"{shape_label(shape)} "
    return f"offsite {label}{policy} {precision}"


def accuracy_cells() -> list[tuple[str, list[str]]]:
    """(name, overrides) in the order they run: the LoRA default, the fastest policy, the
    quantized LoRA cells and the other policies at the default precision first."""
    first = [("bf16", "lora"), ("bf16", "top"), ("int8", "lora"), ("int4", "lora")]
    first += [("bf16", p) for p in ("sparse", "full", "bias", "lora-top")]
    first = [(DEFAULT_SHAPE, q, p) for q, p in first]
    first += [(s, q, p) for s in SMALL_SHAPES for p in SMALL_POLICIES for q in SMALL_PRECISIONS]
    rest = [(DEFAULT_SHAPE, q, p) for q in ("bf16", "int8", "int4", "fp32") for p in POLICIES]
    order = first + [cell for cell in rest if cell not in first]
    from cells import COMPRESSED_OVERRIDES, LAYER_DROP_OVERRIDES

    cells = [
        (COMPRESSED_CELL, ["train.adapter=lora", "train.precision=bf16", *COMPRESSED_OVERRIDES])
    ]
    for shape, precision, policy in order:
        overrides = [f"train.adapter={policy}"]
        overrides.append(f"train.precision={'fp32' if precision == 'fp32' else 'bf16'}")
        overrides += [*LAYER_DROP_OVERRIDES, f"emulator.keep={DEFAULT_SHAPE[1]}"]
        if precision in ("int8", "int4"):
            overrides.append(f"emulator.quantize={precision}")
        if shape != DEFAULT_SHAPE:
            checkpoint = WORK / f"distill-cosine-{shape_suffix(shape)}"  # shared by precisions
            bottom, keep, top = shape
            overrides += [f"emulator.bottom={bottom}", f"emulator.keep={keep}"]
            overrides += [f"emulator.top={top}", "emulator.selection=cosine"]
            overrides += ["emulator.distill=true", f"emulator.distill_checkpoint='{checkpoint}'"]
        cells.append((cell_name(shape, policy, precision), overrides))
    return cells


# ---------------------------------------------------------------- the report


def _mb(value: float) -> float:
    return value / 2**20


def summarise(model: str, rows: list[dict[str, Any]], accuracy: dict[str, float]) -> dict:
    """Ratios against the full fine-tuning baselines, and the verdict on the goals: speed
    against the fastest baseline, memory against the one with the lowest peak (each the
    baseline's best, so neither ratio profits from the other's trade-off)."""
    done = {r["name"]: r for r in rows}
    candidates = [done[n] for n in BASELINES if n in done]
    if not candidates:
        return {"model": model, "baseline": None}
    base = max(candidates, key=lambda r: r["tokens_per_second"])
    lean = min(candidates, key=lambda r: r["peak_rss"])
    for r in rows:
        r["same_run_as_baseline"] = r.get("measured") == base.get("measured")
        r["speedup"] = r["tokens_per_second"] / base["tokens_per_second"]
        r["memory_ratio"] = lean["peak_rss"] / r["peak_rss"]
        r["memory_ratio_over_runtime"] = (lean["peak_rss"] - lean["rss_imports"]) / max(
            r["peak_rss"] - r["rss_imports"], 1
        )
        if r["name"] in accuracy:
            r["plug_in"] = accuracy[r["name"]]
    reference = accuracy.get("offsite lora bf16")
    eligible = [
        r
        for r in rows
        if r["kind"] == "offsite"
        and r["same_run_as_baseline"]
        and reference is not None
        and r["name"] in accuracy
        and accuracy[r["name"]] >= reference - ACCURACY_TOLERANCE
    ]
    best = max(
        eligible, key=lambda r: min(r["speedup"] / 6.5, r["memory_ratio"] / 5.6), default=None
    )
    return {
        "model": model,
        "baseline": base["name"],
        "baseline_tokens_per_second": base["tokens_per_second"],
        "baseline_peak_rss_mb": _mb(base["peak_rss"]),
        "memory_baseline": lean["name"],
        "memory_baseline_peak_rss_mb": _mb(lean["peak_rss"]),
        "baseline_measured": base.get("measured", "in an earlier run"),
        "lora_default_plug_in": reference,
        "best": None
        if best is None
        else {
            "name": best["name"],
            "speedup": best["speedup"],
            "memory_ratio": best["memory_ratio"],
            "memory_ratio_over_runtime": best["memory_ratio_over_runtime"],
            "plug_in": best.get("plug_in"),
            "meets_speedup": best["speedup"] >= GOALS["speedup"],
            "meets_memory": best["memory_ratio"] >= GOALS["memory"],
        },
    }


def _spread(row: dict[str, Any], key: str, unit: float) -> str:
    """The row's (median) value, with the range over its runs when it was measured repeatedly."""
    text = f"{row[key] / unit:.0f}"
    runs = row.get("runs", [])
    if len(runs) > 1:
        values = [run[key] / unit for run in runs]
        text += f" ({min(values):.0f}–{max(values):.0f})"
    return text


def _fmt(value: Any, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return pattern.format(value)


def write_report(
    tables: dict[str, list[dict]], accuracy: dict[str, float], meta: dict[str, Any]
) -> None:
    REPORTS.mkdir(parents=True, exist_ok=True)
    summaries = [summarise(model, rows, accuracy) for model, rows in tables.items()]
    data = {"meta": meta, "accuracy": accuracy, "models": tables, "summaries": summaries}
    (REPORTS / "client.json").write_text(json.dumps(data, indent=1))
    small_names = " and ".join(shape_label(s) for s in SMALL_SHAPES)
    lines = [
        "# Client benchmark: offsite client vs full-model fine-tuning",
        "",
        f"Written {meta['date']}, measured on {meta['machine']}; {meta['steps']} measured "
        f"steps after {meta['warmup']} warm-up steps per cell, each cell a fresh process; a "
        "cell measured several times shows the median and (in brackets) the range. Batches: "
        "bbc-news, 8 examples × ≤ 128 tokens. Peak RSS: the process's kernel high-water mark "
        "over the training steps (interpreter and libraries included; 'over runtime' subtracts "
        "what the process held after its imports). Plug-in: accuracy (%) of the adapter plugged "
        "into the full model after the default federated run (4 clients × 3 rounds) with that "
        "policy and precision; the synthetic model has random weights, so its rows carry the "
        "default model's accuracy for the same cell. Offsite cells train as a client does "
        "(``client.session``): on the lean runtime (``client.runtime``: no transformers, PEFT "
        "or torch compiler in the process) with saved activations in a reused buffer "
        "(``client.kernels.arena``) instead of trimming the C heap after each step, and with "
        "jemalloc as the C allocator where one is installed, as a node's SuperNode starts them "
        "(``offsite.host.allocator``; column 'allocator'). Full fine-tuning is measured three "
        "ways: on glibc's allocator trimming the heap after each step, on glibc without "
        "trimming, and on jemalloc: speed-ups are against the fastest baseline row, memory "
        "ratios against the one with the lowest peak. "
        f"Cells named {small_names} use smaller emulators: for accuracy their middle blocks "
        "are chosen by cosine selection and distilled (200 steps on public chitchat text); "
        "their throughput bundles have the same shapes, undistilled. Cells without a shape "
        "in their name train on the 2-16-2 plain layer drop (the default until 2026-12-06); "
        "'offsite 2-26-2 fisher-svd lora int8' trains on the default emulator of 2026-12-06 "
        "(every middle block kept, norms folded, each linear SVD-factorized in the LM loss's "
        "K-FAC metric with 43.3 % of the middle's parameters, int8 factors) and "
        f"'{COMPRESSED_CELL}' on today's, the same compression with 1 bottom and 3 top "
        "adapter blocks (since 2026-12-07).",
        "",
    ]
    for summary in summaries:
        model = summary["model"]
        lines += [f"## {model}", ""]
        if summary.get("baseline") is None:
            lines += ["(baselines not measured yet)", ""]
            continue
        lines += [
            f"Speed baseline (the fastest full fine-tuning): **{summary['baseline']}**, "
            f"{summary['baseline_tokens_per_second']:.0f} tokens/s (measured "
            f"{summary['baseline_measured']}). Memory baseline (the lowest peak): "
            f"**{summary['memory_baseline']}**, {summary['memory_baseline_peak_rss_mb']:.0f} MB.",
            "",
            "| cell | allocator | trainable | tokens/s | speed-up | peak RSS (MB) | memory ÷ | "
            "÷ over runtime | plug-in |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in tables[model]:
            mark = "" if r.get("same_run_as_baseline", True) else " †"
            lines.append(
                f"| {r['name']}{mark} | {r.get('allocator', 'system')} | "
                f"{r['trainable_parameters'] / 1e6:.2f} M | "
                f"{_spread(r, 'tokens_per_second', 1)} | {r['speedup']:.2f}× | "
                f"{_spread(r, 'peak_rss', 2**20)} | "
                f"{r['memory_ratio']:.2f}× | {r['memory_ratio_over_runtime']:.2f}× | "
                f"{_fmt(r.get('plug_in'), '{:.1f}')} |"
            )
        best = summary.get("best")
        lines.append("")
        earlier = sorted(
            {
                str(r.get("measured", "an earlier run"))
                for r in tables[model]
                if not r.get("same_run_as_baseline", True)
            }
        )
        if earlier:
            lines += [
                f"† measured in an earlier run ({', '.join(earlier)}), not side by side with "
                "this baseline: compare its ratios with care.",
                "",
            ]
        if best is not None:
            met = [
                ("throughput", best["meets_speedup"]),
                ("memory", best["meets_memory"]),
            ]
            missed = [goal for goal, ok in met if not ok]
            verdict = (
                "meets the goal"
                if not missed
                else f"misses the {' and '.join(missed)} goal{'s' if len(missed) > 1 else ''}"
            )
            lines.append(
                f"Best policy within {ACCURACY_TOLERANCE:g} point of the LoRA default "
                f"({_fmt(summary['lora_default_plug_in'], '{:.1f}')} %): **{best['name']}** "
                f"(plug-in {_fmt(best['plug_in'], '{:.1f}')} %) — "
                f"{best['speedup']:.2f}× throughput, {best['memory_ratio']:.2f}× lower peak RSS "
                f"({best['memory_ratio_over_runtime']:.2f}× over runtime); {verdict} "
                f"(≥ {GOALS['speedup']}× and ≥ {GOALS['memory']}×)."
            )
            lines.append("")
    versions: dict[str, list[str]] = {}
    for model, rows in tables.items():
        for r in rows:
            versions.setdefault(r.get("code", "before the commit stamp"), []).append(
                f"{r['name']} ({model.split(' ')[0]})"
            )
    if len(versions) > 1:
        lines += ["Code each throughput row was measured on (cached rows are not re-measured):", ""]
        lines += [f"- {code}: {', '.join(names)}" for code, names in versions.items()]
        lines.append("")
    lines += ["Cells still pending: " + (", ".join(meta.get("pending", [])) or "none"), ""]
    (REPORTS / "client.md").write_text("\n".join(lines))
    plot(tables, REPORTS / "client.png")


def _draw_goal(ax, baselines: list[dict]) -> None:
    """Dashed lines where a cell meets the goals against these full fine-tuning rows: above
    ``GOALS['speedup']`` × the fastest, left of the lowest peak ÷ ``GOALS['memory']``."""
    if not baselines:
        return
    speed = GOALS["speedup"] * max(r["tokens_per_second"] for r in baselines)
    memory = min(_mb(r["peak_rss"]) for r in baselines) / GOALS["memory"]
    style = {"color": "gray", "linestyle": "--", "linewidth": 0.8}
    ax.axhline(speed, **style)
    ax.axvline(memory, **style)
    ax.annotate(
        f"goal: ≥ {GOALS['speedup']}× faster, ≥ {GOALS['memory']}× less memory (up-left)",
        (1.0, speed),
        xycoords=("axes fraction", "data"),
        ha="right",
        fontsize=7,
        color="gray",
        xytext=(-4, 3),
        textcoords="offset points",
    )


def plot(tables: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(7 * len(tables), 5.5), squeeze=False)
    markers = {"fp32": "o", "bf16": "s", "int8": "^", "int4": "v"}
    colors = {p: f"C{i}" for i, p in enumerate(POLICIES)}
    for ax, (model, rows) in zip(axes[0], tables.items(), strict=True):
        for r in rows:
            x, y = _mb(r["peak_rss"]), r["tokens_per_second"]
            if r["kind"] == "offsite":
                color = colors[r["policy"]]
                small = r.get("emulator", "2-16-2") != shape_label(DEFAULT_SHAPE)  # hollow: small
                ax.scatter(
                    x,
                    y,
                    marker=markers[r["precision"]],
                    edgecolors=color,
                    facecolors="none" if small else color,
                )
                if small:  # name the emulator shape
                    ax.annotate(
                        r["emulator"],
                        (x, y),
                        fontsize=7,
                        xytext=(5, -3),
                        textcoords="offset points",
                    )
            else:
                ax.scatter(x, y, marker="*", s=160, color="black")
                below = r["kind"] != "full-ft"  # full LoRA sits level with full FT: label apart
                ax.annotate(
                    r["name"],
                    (x, y),
                    fontsize=8,
                    xytext=(4, -11 if below else 4),
                    textcoords="offset points",
                )
        _draw_goal(ax, [r for r in rows if r["kind"] == "full-ft"])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("peak RSS over training steps (MB, log)")
        ax.set_ylabel("training tokens / s (log)")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
    handles = [
        plt.Line2D([], [], color=c, marker="o", linestyle="", label=p) for p, c in colors.items()
    ]
    handles += [
        plt.Line2D([], [], color="gray", marker=m, linestyle="", label=q)
        for q, m in markers.items()
    ]
    handles.append(
        plt.Line2D(
            [],
            [],
            color="gray",
            marker="o",
            markerfacecolor="none",
            linestyle="",
            label="hollow: a smaller emulator",
        )
    )
    axes[0][0].legend(handles=handles, fontsize=8, loc="lower left")
    fig.suptitle("Offsite client vs full-model fine-tuning (up and left is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- main


def code_version() -> str:
    """The checkout's commit (rows carry it: cached cells may predate a change)."""
    done = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "unknown"


def earlier_results(
    results_path: Path, accuracy_path: Path, fresh: bool
) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """Cached rows and plug-in scores: bench/out's, or on a checkout without it the committed
    report's, so that re-measuring a few cells (--only) keeps every other row."""
    if fresh:
        return {}, {}
    report = REPORTS / "client.json"
    committed = json.loads(report.read_text()) if report.is_file() else {}
    tables = (
        json.loads(results_path.read_text())
        if results_path.is_file()
        else committed.get("models", {})
    )
    accuracy = (
        json.loads(accuracy_path.read_text())
        if accuracy_path.is_file()
        else committed.get("accuracy", {})
    )
    return tables, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="measured steps per cell")
    parser.add_argument("--warmup", type=int, default=2, help="discarded steps per cell")
    parser.add_argument(
        "--part",
        choices=("all", "throughput", "accuracy", "report"),
        default="all",
        help="what to run ('report' only rewrites the report from the cached results)",
    )
    parser.add_argument("--fresh", action="store_true", help="re-run finished cells")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated cells to re-measure now (e.g. 'offsite 2-6-2 lora bf16'): their "
        "throughput rows, with the full fine-tuning baselines re-measured beside them so their "
        "ratios compare rows of one run, and their plug-in accuracy (a fresh federated run "
        "each). Other cached rows are kept and marked with their date",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="measure every cell this many times, in rounds over all cells; rows report the "
        "median tokens/s and the median peak RSS (each run's numbers are kept in the JSON)",
    )
    parser.add_argument(
        "--models",
        default=",".join(info["key"] for info in MODELS.values()),
        help="which models' throughput to measure (comma-separated keys: default, deep48)",
    )
    args = parser.parse_args()
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    if only:
        only |= set(BASELINES)

    from cells import quiet_setup, simulate_cell

    from offsite.catalog import resolve_model

    quiet_setup()
    WORK.mkdir(parents=True, exist_ok=True)
    results_path = WORK / "throughput.json"
    accuracy_path = WORK / "accuracy.json"
    tables, accuracy = earlier_results(results_path, accuracy_path, args.fresh)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, torch threads default",
        "steps": args.steps,
        "warmup": args.warmup,
        "pending": [],
        "code": code_version(),
    }
    if args.part in ("all", "throughput"):
        default_path = Path(resolve_model("smollm2-135m"))
        paths = {"default": default_path}
        chosen = set(args.models.split(","))
        if "deep48" in chosen:
            paths["deep48"] = synthetic_model(48, default_path, WORK / "synthetic-48")
        for model, info in MODELS.items():
            if info["key"] not in chosen:
                continue
            path = paths[info["key"]]
            bundles = {
                (shape, q): WORK / "-".join(p for p in (info["key"], shape_suffix(shape), q) if p)
                for shape, q in sorted({(s, bundle_precision(q)) for s, _, q in offsite_grid()})
            }
            rows = tables.setdefault(model, [])
            specs = [
                spec
                for spec in throughput_specs(
                    path,
                    bundles,
                    args,
                    WORK / f"default-compressed-{shape_label(COMPRESSED_SHAPE)}"
                    if info["key"] == "default"
                    else None,
                )
                if (spec["name"] in only)
                or (not only and not any(r["name"] == spec["name"] for r in rows))
            ]
            for spec in specs:
                if spec["kind"] == "offsite":  # built once, when a cell first needs it
                    quantize = bundle_precision(spec["precision"])
                    ensure_bundle(
                        path,
                        "none" if quantize == "fp32" else quantize,
                        Path(spec["bundle"]),
                        tuple(spec["shape"]),
                        compressed=spec.get("compressed", False),
                    )
            runs: dict[str, list[dict[str, Any]]] = {}
            for repeat in range(args.repeats):  # rounds over all cells: noise spreads evenly
                for spec in specs:
                    start = time.perf_counter()
                    result = cell_in_subprocess(spec)
                    runs.setdefault(spec["name"], []).append(result)
                    row = median_row(runs[spec["name"]]) | {
                        "code": meta["code"],
                        "measured": meta["date"],
                    }
                    rows[:] = [r for r in rows if r["name"] != spec["name"]] + [row]
                    print(
                        f"{model} | {spec['name']} (run {repeat + 1}/{args.repeats}): "
                        f"{result['tokens_per_second']:.0f} tok/s, peak "
                        f"{_mb(result['peak_rss']):.0f} MB ({time.perf_counter() - start:.0f} s)",
                        flush=True,
                    )
                    results_path.write_text(json.dumps(tables, indent=1))
                    write_report(tables, accuracy, meta)
    if args.part in ("all", "accuracy"):
        cells = accuracy_cells()
        if only:
            cells = [(name, overrides) for name, overrides in cells if name in only]
            for name, _ in cells:
                accuracy.pop(name, None)
        for index, (name, overrides) in enumerate(cells):
            if name in accuracy:
                continue
            meta["pending"] = [n for n, _ in cells[index:] if n not in accuracy]
            write_report(tables, accuracy, meta)
            run = WORK / "runs" / name.replace(" ", "-")
            metrics = simulate_cell(run, overrides, args.fresh or bool(only))
            accuracy[name] = 100 * metrics["scores"]["plug_in"]["value"]
            print(f"accuracy | {name}: plug-in {accuracy[name]:.1f} %", flush=True)
            accuracy_path.write_text(json.dumps(accuracy, indent=1))
    meta["pending"] = [n for n, _ in accuracy_cells() if n not in accuracy]
    write_report(tables, accuracy, meta)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "cell":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import logging

        logging.basicConfig(level=logging.ERROR)
        print(json.dumps(run_cell(json.loads(sys.argv[2]))))
    else:
        main()
