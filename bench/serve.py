"""Benchmark `offsite serve`: latency and throughput with and without an adapter, hot-swap time.

Run: .venv/bin/python bench/serve.py [--model smollm2-135m] [--adapter PEFT_DIR] [--requests 20]

Base and adapter requests are interleaved in one run on one server (this machine is noisy, so
ratios measured side by side are what to read). Without --adapter, a random LoRA adapter of the
offsite default shape (r=8 on the 2 bottom + 2 top blocks) is built for the measurement.
Writes bench/reports/serve.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPORTS = Path(__file__).resolve().parent / "reports"


def _random_adapter(model_path: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path)
    layers = model.config.num_hidden_layers
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        layers_to_transform=[0, 1, layers - 2, layers - 1],
        layers_pattern="layers",
    )
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    peft_model.save_pretrained(out)
    return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=20, help="per model (after 2 warm-up)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--swaps", type=int, default=5)
    args = parser.parse_args()

    import torch
    import uvicorn

    from coordinator.serve import Engine, build_app
    from offsite.catalog import resolve_model

    model_path = Path(resolve_model(args.model))
    adapter = args.adapter or _random_adapter(model_path, Path(tempfile.mkdtemp()) / "adapter")
    engine = Engine(model_path, "base")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    server = uvicorn.Server(uvicorn.Config(build_app(engine), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)

    client = httpx.Client(timeout=600)
    swaps_load, swaps_unload = [], []
    for _ in range(args.swaps):
        start = time.perf_counter()
        client.post(
            f"{url}/load_lora_adapter", json={"lora_name": "ad", "lora_path": str(adapter)}
        ).raise_for_status()
        swaps_load.append(time.perf_counter() - start)
        start = time.perf_counter()
        client.post(f"{url}/unload_lora_adapter", json={"lora_name": "ad"}).raise_for_status()
        swaps_unload.append(time.perf_counter() - start)
    client.post(
        f"{url}/load_lora_adapter", json={"lora_name": "ad", "lora_path": str(adapter)}
    ).raise_for_status()

    prompt = "Article: Shares in the bank rose sharply after the results were announced.\nTopic:"
    results: dict[str, dict[str, list[float]]] = {
        m: {"latency": [], "tokens": [], "first_token": []} for m in ("base", "ad")
    }
    for i in range(args.requests + 2):
        for model in ("base", "ad"):  # interleaved, side by side
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "stream": True,
            }
            start = time.perf_counter()
            first, tokens = None, 0
            with client.stream("POST", f"{url}/completions", json=body) as response:
                for line in response.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunk = json.loads(line[6:])
                        if chunk["choices"][0]["text"] and first is None:
                            first = time.perf_counter() - start
                        tokens += 1 if chunk["choices"][0]["text"] else 0
            elapsed = time.perf_counter() - start
            if i >= 2:  # discard warm-up
                results[model]["latency"].append(elapsed)
                results[model]["first_token"].append(first or elapsed)
                results[model]["tokens"].append(tokens)
    server.should_exit = True

    summary = {}
    for model, r in results.items():
        total_tokens = sum(r["tokens"])
        summary[model] = {
            "requests": len(r["latency"]),
            "p50_s": statistics.median(r["latency"]),
            "p95_s": _percentile(r["latency"], 0.95),
            "first_chunk_p50_s": statistics.median(r["first_token"]),
            "tokens_per_s": total_tokens / sum(r["latency"]),
        }
    report = {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "threads": torch.get_num_threads(),
        "summary": summary,
        "adapter_over_base_latency_p50": summary["ad"]["p50_s"] / summary["base"]["p50_s"],
        "hot_swap": {
            "load_p50_s": statistics.median(swaps_load),
            "unload_p50_s": statistics.median(swaps_unload),
            "swaps": args.swaps,
        },
    }
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "serve.json").write_text(json.dumps(report, indent=1))
    lines = [
        "# `offsite serve` benchmark",
        "",
        f"Model {args.model}, {args.max_tokens} new tokens per streamed completion, greedy, "
        f"{report['threads']} torch threads, requests interleaved base/adapter "
        f"({summary['base']['requests']} each after 2 warm-up).",
        "",
        "| model | p50 latency | p95 latency | first chunk p50 | tokens/s |",
        "|---|---|---|---|---|",
    ]
    for model, s in summary.items():
        name = "base" if model == "base" else "with LoRA adapter"
        lines.append(
            f"| {name} | {s['p50_s']:.3f} s | {s['p95_s']:.3f} s | {s['first_chunk_p50_s']:.3f} s "
            f"| {s['tokens_per_s']:.1f} |"
        )
    lines += [
        "",
        f"Adapter / base p50 latency: {report['adapter_over_base_latency_p50']:.2f}×.",
        f"Hot swap (median of {args.swaps}): "
        f"load {report['hot_swap']['load_p50_s'] * 1000:.0f} ms, "
        f"unload {report['hot_swap']['unload_p50_s'] * 1000:.0f} ms.",
        "",
        "![latency](serve.png)",
        "",
    ]
    (REPORTS / "serve.md").write_text("\n".join(lines))
    _plot(results, REPORTS / "serve.png")
    print("\n".join(lines))


def _plot(results: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.boxplot([results["base"]["latency"], results["ad"]["latency"]])
    ax.set_xticks([1, 2], ["base", "with adapter"])
    ax.set_ylabel("request latency (s)")
    ax.set_title("offsite serve: streamed completion latency")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
