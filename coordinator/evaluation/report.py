"""Run reports: ``metrics.json``, ``report.md`` and PNG plots in the run folder."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from coordinator.evaluation.five_way import SETTINGS
from coordinator.state.folder import RunFolder
from emulator.build import describe_privacy
from offsite.wire.messages import TrainReply


def five_way_rows(scores: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    rows = []
    for key, title in SETTINGS:
        if key in scores:
            score = scores[key]
            rows.append((title, format_score(score["metric"], score["value"])))
    return rows


def format_score(metric: str, value: float) -> str:
    return f"{100 * value:.1f} %" if metric == "accuracy" else f"{value:.2f} ppl"


def five_way_table(scores: dict[str, dict[str, Any]]) -> str:
    rows = five_way_rows(scores)
    width = max(len(t) for t, _ in rows)
    lines = [f"| {'setting'.ljust(width)} | score    |", f"|{'-' * (width + 2)}|----------|"]
    lines += [f"| {title.ljust(width)} | {value.rjust(8)} |" for title, value in rows]
    return "\n".join(lines)


def margin_lines(
    scores: dict[str, dict[str, Any]], training: dict[str, Any] | None = None
) -> list[str]:
    """The privacy margin and the gain from tuning, unless the adapter never changed (then the
    plug-in is the full model and there is no margin to claim)."""
    if not {"plug_in", "emulator_fine_tuned", "full_zero_shot"} <= scores.keys():
        return []
    if training is not None and not training.get("adapter_changed", True):
        return [
            "the adapter did not change in training: the plug-in is the untouched full model, "
            "so there is no privacy margin or gain to report"
        ]
    metric = scores["plug_in"]["metric"]
    plug, emu, zero = (
        scores[k]["value"] for k in ("plug_in", "emulator_fine_tuned", "full_zero_shot")
    )
    if metric == "accuracy":
        return [
            f"plug-in − emulator fine-tuned (privacy margin): {100 * (plug - emu):+.1f} points",
            f"plug-in − full zero-shot (gain from tuning): {100 * (plug - zero):+.1f} points",
        ]
    return [
        f"emulator fine-tuned ÷ plug-in perplexity (privacy margin): {emu / plug:.2f}×",
        f"full zero-shot ÷ plug-in perplexity (gain): {zero / plug:.2f}×",
    ]


def transfer_warnings(
    scores: dict[str, dict[str, Any]], training: dict[str, Any] | None = None
) -> list[str]:
    """What the five numbers say went wrong with the transfer, each with what to try: a plug-in
    that does not beat the untouched full model, or one the emulator beats (no privacy margin).
    Empty when neither happened, or when the adapter never trained (run health says that)."""
    if not {"plug_in", "emulator_fine_tuned", "full_zero_shot"} <= scores.keys():
        return []
    if training is not None and not training.get("adapter_changed", True):
        return []
    lower_is_better = scores["plug_in"]["metric"] == "perplexity"
    plug, emu, zero = (
        scores[k]["value"] for k in ("plug_in", "emulator_fine_tuned", "full_zero_shot")
    )

    def worse_or_equal(a: float, b: float) -> bool:
        return a >= b if lower_is_better else a <= b

    def shown(value: float) -> str:
        return f"{value:.2f}" if lower_is_better else f"{100 * value:.1f} %"

    out = []
    if worse_or_equal(plug, zero):
        out.append(
            f"the plug-in ({shown(plug)}) does not beat the untouched full model "
            f"({shown(zero)}): the adapter learned the emulator, not the task. Try an emulator "
            "closer to the full model (a larger emulator.keep, emulator.selection='cosine' with "
            "emulator.distill=true, or with emulator.factorize a higher "
            "emulator.factorize_energy / factorize_budget), more federation.rounds or "
            "train.local_steps, and a data.template that ends where the label starts"
        )
    if worse_or_equal(plug, emu) and not (plug == emu == zero):
        out.append(
            f"the plug-in ({shown(plug)}) does not beat emulator fine-tuning ({shown(emu)}): "
            "data owners already get as much from the emulator as from the product, so there "
            "is no privacy margin. Try a more compressed emulator (a lower emulator.keep, "
            "emulator.quantize='int8', or with emulator.factorize a lower "
            "emulator.factorize_energy / factorize_budget); `offsite bench emulator` compares them"
        )
    return out


def plot_losses(rounds: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for entry in rounds:
        reply = TrainReply.from_report(entry)
        if reply is not None and reply.train_loss is not None:
            curves[reply.partition_id].append((int(entry["round"]), reply.train_loss))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for client, points in sorted(curves.items()):
        points.sort()
        ax.plot(
            [p[0] for p in points], [p[1] for p in points], marker="o", label=f"client {client}"
        )
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("mean local training loss")
    ax.set_title("Local training loss per round and client")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_five_way(scores: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(k, t) for k, t in SETTINGS if k in scores]
    metric = scores[keys[0][0]]["metric"]
    values = [scores[k]["value"] * (100 if metric == "accuracy" else 1) for k, _ in keys]
    colors = ["#9e9e9e", "#bdbdbd", "#64b5f6", "#1e88e5", "#43a047"][: len(keys)]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    bars = ax.bar([t for _, t in keys], values, color=colors)
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(
            f"{value:.1f}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax.set_ylabel("accuracy (%)" if metric == "accuracy" else "perplexity (lower is better)")
    ax.set_title("Five-way evaluation on held-out data")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(folder: RunFolder, metrics: dict[str, Any]) -> Path:
    """Write metrics.json, the plots and report.md; return the report path."""
    folder.metrics_path.write_text(json.dumps(metrics, indent=1, default=_json_default))
    scores = metrics["scores"]
    plot_five_way(scores, folder.plot_path("five_way"))
    plot_losses(metrics.get("rounds", []), folder.plot_path("loss_per_round"))
    info = metrics["run"]
    training = metrics.get("training") or {}
    warning = training.get("warning", "")
    transfer = transfer_warnings(scores, training or None)
    lines = [
        f"# Offsite run `{folder.name}`",
        "",
        *([f"**Warning: {warning}.**", ""] if warning else []),
        *[f"**Warning: {text}.**\n" for text in transfer],
        f"Model **{info['model']}** split {info['plan']} (adapter {info['adapter']}), task "
        f"**{info['data']}** ({info['eval_examples']} held-out examples), "
        f"{info['num_clients']} clients × {info['rounds']} rounds of FedAvg"
        + (
            f" (LoRA aggregation: {info['lora_aggregation']})."
            if "lora_aggregation" in info
            else "."
        ),
        "",
        "## Five-way evaluation",
        "",
        five_way_table(scores),
        "",
        *[f"- {line}" for line in margin_lines(scores, training or None)],
        "",
        f"![five-way]({folder.plot_path('five_way').name})",
        "",
        "## Training",
        "",
        f"![loss]({folder.plot_path('loss_per_round').name})",
        "",
        "## Sizes and time",
        "",
        f"- full model: {info['full_params'] / 1e6:.1f} M parameters; emulator bundle "
        f"{info['bundle_bytes'] / 1e6:.1f} MB; adapter update "
        f"{info['adapter_bytes'] / 1e3:.1f} kB per client per round"
        + (
            f" (download {info['download_bytes'] / 1e3:.1f} kB, upload "
            f"{info['upload_bytes'] / 1e3:.1f} kB)"
            if "download_bytes" in info
            else ""
        ),
        *_bundle_part_lines(info),
        f"- middle blocks shipped: {info['middle_kept']} of {info['middle_total']}; "
        f"full-model middle blocks never sent: {info['middle_dropped']}",
        *([f"- {describe_privacy(info['privacy'])}"] if info.get("privacy") else []),
        *_distillation_lines(info.get("compression", {})),
        *_outcome_lines(metrics.get("outcomes", [])),
        *[f"- {stage}: {seconds:.1f} s" for stage, seconds in metrics["timings"].items()],
        *[f"- {name}: {text}" for name, text in metrics.get("notes", {}).items()],
        "",
        f"Reproduce: `{info['command']}`",
        "",
    ]
    folder.report_path.write_text("\n".join(lines))
    return folder.report_path


def write_failure_report(folder: RunFolder, metrics: dict[str, Any], error: str) -> Path:
    """``metrics.json`` and a ``report.md`` for a run that trained nothing: no five-way table."""
    folder.metrics_path.write_text(json.dumps(metrics, indent=1, default=_json_default))
    lines = [
        f"# Offsite run `{folder.name}`: failed",
        "",
        f"**{error}**",
        "",
        "No five-way evaluation was run: the adapter never trained.",
        "",
        *_outcome_lines(metrics.get("outcomes", [])),
        *[
            f"- {failure}"
            for failure in (metrics.get("training") or {}).get("client_failures", [])[:20]
        ],
        "",
    ]
    folder.report_path.write_text("\n".join(lines))
    return folder.report_path


def _bundle_part_lines(info: dict[str, Any]) -> list[str]:
    """Where the bundle's bytes go, so the owner sees what to compress."""
    parts = info.get("bundle_parts")
    if not parts:
        return []
    embeddings = (info.get("compression") or {}).get("embeddings")
    stored = f" ({embeddings['scheme']['name']})" if embeddings else " (full precision)"
    shown = ", ".join(
        f"{name}{stored if name == 'embeddings' else ''} {size / 1e6:.1f} MB"
        for name, size in parts.items()
    )
    return [f"- bundle by part: {shown}"]


def _outcome_lines(outcomes: list[dict[str, Any]]) -> list[str]:
    """Failed rounds and, under differential privacy, ε after each round."""
    lines = [
        f"- round {o['round']}: {o['outcome']}"
        for o in outcomes
        if not str(o.get("outcome", "")).startswith("aggregated")
    ]
    spent = [f"{o['epsilon']:.2f}" for o in outcomes if "epsilon" in o]
    if spent:
        lines.append(f"- differential privacy: ε after each round {', '.join(spent)}")
    errors = [f"{o['lora_product_error']:.3f}" for o in outcomes if "lora_product_error" in o]
    if errors:
        merged = any(o.get("lora_aggregation") == "merge-exact" for o in outcomes)
        lines.append(
            "- naive LoRA averaging error ‖mean(B)·mean(A) − mean(B·A)‖ / ‖mean(B·A)‖ per round: "
            + ", ".join(errors)
            + (" (avoided: merge-exact applied mean(B·A))" if merged else "")
        )
    return lines


def _distillation_lines(compression: dict[str, Any]) -> list[str]:
    lines = []
    if distilled := compression.get("distilled"):
        curve = distilled.get("evaluations") or []
        start = f"{curve[0][1]:.1f}" if curve else "?"
        lines.append(
            f"- emulator distilled {distilled['steps']} steps on {distilled['corpus']} "
            f"({distilled['texts']} texts): held-out perplexity {start} → "
            f"{distilled['best_perplexity']:.1f} (best at step {distilled['best_step']})"
        )
    if quant := compression.get("quantization"):
        scheme = quant["scheme"]
        groups = f", groups of {scheme['group_size']}" if scheme["name"] == "int4" else ""
        calibration = (
            f"activation-aware scales from {quant['calibration_texts']} public texts"
            if quant.get("calibrated")
            else "round to nearest"
        )
        lines.append(
            f"- emulator middle linears stored {scheme['name']}{groups} ({quant['layers']} "
            f"layers, {calibration})"
        )
    return lines


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
