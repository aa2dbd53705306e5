"""The one ``offsite`` command line.

Subcommands import their heavy dependencies (torch, transformers, flwr) inside the command, so
``offsite --help`` is instant. Exit codes: one table, ``offsite.errors.ExitCode``, listed in
``offsite --help``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from offsite.cli.caches import cache
from offsite.cli.deploy import client_app, coordinator_app
from offsite.errors import ConfigError, ExitCode, OffsiteError, exit_code_table

app = typer.Typer(
    name="offsite",
    help=(
        "Federated offsite-tuning: fine-tune a large model's adapter on data you never see.\n\n"
        "The model owner splits the full model into a small trainable adapter and a lossy "
        "emulator; data owners train the adapter against the emulator and send back only the "
        "adapter; the owner aggregates the adapters and plugs them into the full model.\n\n"
        "Start with `offsite simulate` (a multi-client federated run on the embedded default)."
    ),
    epilog=f"Exit codes: {exit_code_table()}.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
emulator_app = typer.Typer(help="Build and inspect emulator bundles.", no_args_is_help=True)
app.command("cache")(cache)
app.add_typer(emulator_app, name="emulator")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(client_app, name="client")
bench_app = typer.Typer(
    help="Benchmarks (need a source checkout: they live in its bench/ folder).",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (see `offsite config` for all keys)."),
]
Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="Config overrides as section.key=value, e.g. federation.rounds=2."),
]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        stream=sys.stderr,
        force=True,
    )
    for ours in ("offsite", "emulator", "client", "coordinator"):
        logging.getLogger(ours).setLevel(logging.DEBUG if verbose else logging.INFO)


def _quiet_libraries() -> None:
    """Keep third-party progress bars and advisories out of the user's way."""
    import os
    import warnings

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # transformers leaves it unannotated


@app.command()
def simulate(
    overrides: Overrides = None,
    config: ConfigOption = None,
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="Write into this folder instead of a new one.")
    ] = None,
    serve_url: Annotated[
        str | None,
        typer.Option(
            "--serve-url",
            help="Push every round's aggregated adapter to this running `offsite serve` "
            "(same as federation.serve_url=...).",
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue an interrupted run folder after its last completed round "
            "(its config.toml is used; no overrides).",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Run a multi-client federated offsite-tuning simulation and print the five-way table.

    Defaults: SmolLM2-135M split 2-26-2 (every middle block kept, its linears low-rank
    factorized by fisher-svd and int8), bbc-news topic classification, 4 non-IID clients,
    3 rounds of FedAvg over LoRA adapters. The run folder gets report.md, metrics.json, plots,
    the bundle and every round's global adapter.

    Example: offsite simulate federation.rounds=2 train.local_steps=5
    """
    _setup_logging(verbose)
    from offsite.config import load_config

    if resume is not None:
        if overrides or config or run_dir:
            raise typer.BadParameter("--resume takes the run's own config; drop other settings")
        _quiet_libraries()
        from coordinator.state.folder import RunFolder
        from coordinator.workflow.simulate import simulate as run

        cfg = RunFolder.existing(resume, hint="pass the run folder to resume").config()

        run(cfg, resume, verbose=verbose, resume=True)
        return
    extra = [f"federation.serve_url={serve_url!r}"] if serve_url else []
    cfg = load_config(config, [*(overrides or []), *extra])
    _quiet_libraries()
    from coordinator.workflow.simulate import simulate as run

    run(cfg, run_dir, verbose=verbose)


@app.command("run")
def run_deployed(
    overrides: Overrides = None,
    config: ConfigOption = None,
    state: Annotated[
        Path | None,
        typer.Option(
            "--state", help="Coordinator state folder (default: $OFFSITE_HOME/coordinator)."
        ),
    ] = None,
    database: Annotated[
        str | None,
        typer.Option("--database", envvar="OFFSITE_DATABASE_URL", help="Registry database URL."),
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="Write into this folder instead of a new one.")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="Continue an interrupted run folder after its last round."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Stream Flower's log.")] = False,
) -> None:
    """Run a federation on the deployment: `offsite coordinator serve` and enrolled nodes.

    Like `offsite simulate`, but the rounds run on the coordinator's Flower SuperLink with the
    nodes that joined (`offsite client join` + `offsite client start`), each training on its own
    data; `data.name` is only the coordinator's held-out evaluation set, and
    `federation.num_clients` the number of nodes a round waits for. The bundle is signed and
    published on the artifact service; nodes download and verify it on first use.

    Example: offsite run federation.num_clients=2 federation.rounds=2
    """
    import os

    os.umask(0o077)  # the coordinator's artifacts, apps and run state: owner-only
    _setup_logging(verbose)
    from coordinator.workflow.deployment import Deployment
    from offsite.config import load_config
    from offsite.host.paths import offsite_home

    deployment = Deployment(state or offsite_home() / "coordinator", database)
    _quiet_libraries()
    from coordinator.workflow.simulate import simulate as run

    if resume is not None:
        if overrides or config or run_dir:
            raise typer.BadParameter("--resume takes the run's own config; drop other settings")
        from coordinator.state.folder import RunFolder

        folder = RunFolder.existing(resume, hint="pass the run folder to resume")
        run(folder.config(), resume, verbose, True, deployment)
        return
    run(load_config(config, overrides or []), run_dir, verbose, deployment=deployment)


@emulator_app.command("build")
def emulator_build(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the bundle into.")],
    overrides: Overrides = None,
    config: ConfigOption = None,
    distill: Annotated[
        bool, typer.Option("--distill", help="Distill the kept middle blocks (emulator.distill).")
    ] = False,
    quantize: Annotated[
        str | None,
        typer.Option(
            "--quantize",
            help="Store the middle linears as 'int8' (per channel) or 'int4' (group-wise), with "
            "activation-aware scales (emulator.quantize).",
        ),
    ] = None,
    choose: Annotated[
        Path | None,
        typer.Option(
            "--choose",
            help="Pick the emulator from measured cells: a report of `offsite bench emulator` "
            "(bench/reports/emulator_transfer.json). Prints the Pareto front, refuses cells "
            "failing emulator.min_margin / max_verbatim_fraction / min_perplexity_ratio, builds "
            "the passing cell with the best plug-in (your overrides still apply on top).",
        ),
    ] = None,
) -> None:
    """Split the full model into adapter + emulator and write a verified bundle.

    Measures what the emulator gives away (middle tensors shipped verbatim, perplexity ratio
    to the full model on public text) and refuses it if it fails the owner's gate
    (emulator.min_perplexity_ratio, emulator.max_verbatim_fraction; exit code 6).
    Uses the model, emulator and train sections of the config (adapter kind and LoRA shape).
    Example: offsite emulator build -o bundle/ emulator.keep=8
    """
    _setup_logging(False)
    from offsite.config import load_config

    extra = ["emulator.distill=true"] if distill else []
    extra += [f"emulator.quantize={quantize!r}"] if quantize else []
    cfg = load_config(config, [*(overrides or []), *extra])
    if choose is not None:
        chosen = _choose_emulator(choose, cfg.emulator)
        cfg = load_config(config, [*chosen, *(overrides or []), *extra])
    _quiet_libraries()
    from coordinator.models import load_full_model
    from emulator.build import build_configured_bundle, describe_compression, describe_privacy

    model, tokenizer, arch, _ = load_full_model(cfg.model.name)
    plan, bundle = build_configured_bundle(model, tokenizer, arch, cfg, out)
    typer.echo(f"bundle {bundle.path}  digest {bundle.digest}")
    typer.echo(
        f"emulator {plan.label}: blocks {list(plan.emulator_layers)} of {plan.num_layers}; "
        + describe_compression(bundle.manifest)
    )
    typer.echo(describe_privacy(bundle.manifest["privacy"]))


def _choose_emulator(report_path: Path, settings: Any) -> list[str]:
    """Print the owner's trade-off from a protocol report and return the chosen cell's config
    overrides; no passing cell is a GateError (exit code 6) naming every refusal."""
    import json

    from emulator.choice import Gates, candidates, choose, describe, pareto_front
    from emulator.privacy import GateError
    from offsite.errors import ConfigError

    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(
            f"--choose {report_path}: not a readable report ({err}); give the JSON that "
            "`offsite bench emulator` writes (bench/reports/emulator_transfer.json)"
        ) from err
    cells = candidates(report) if isinstance(report, dict) else []
    if not cells:
        raise ConfigError(
            f"--choose {report_path}: no measured cell with its overrides in it; re-run "
            "`offsite bench emulator` to write them"
        )
    gates = Gates(
        settings.min_margin, settings.max_verbatim_fraction, settings.min_perplexity_ratio
    )
    typer.echo("Pareto front (plug-in ↑, margin ↑, bundle share ↓):")
    for cell in pareto_front(cells):
        typer.echo(f"  {describe(cell)}")
    best, reasons = choose(cells, gates)
    for name, why in reasons.items():
        if why:
            typer.echo(f"refused {name}: {'; '.join(why)}")
    if best is None:
        raise GateError(
            f"no measured emulator in {report_path} passes the gates (see the refusals above); "
            "measure more cells or loosen emulator.min_margin / max_verbatim_fraction"
        )
    passing = sum(1 for why in reasons.values() if not why)
    typer.echo(f"chose {describe(best)}: the best plug-in of the {passing} passing cell(s)")
    return list(best.overrides)


@emulator_app.command("verify")
def emulator_verify(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    digest: Annotated[
        str | None, typer.Option(help="Expected manifest digest (pins this exact bundle).")
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(
            help="The coordinator's bundle-signing public key: 64 hex characters (as "
            "`offsite client status` shows it in node.json), or a file holding them or a PEM "
            "public key. The manifest signature must verify with it.",
        ),
    ] = None,
) -> None:
    """Check a bundle's manifest, every file digest and every tensor header, and (with --key)
    its signature; says what was not checked."""
    from emulator.bundle import SIGNATURE, verify_bundle
    from offsite.digests import require_sha256

    if digest is not None:
        require_sha256(digest, "--digest")
    verified = verify_bundle(bundle, digest, _bundle_key(key) if key else None)
    typer.echo(
        f"OK {verified.digest} ({verified.plan.label}, {len(verified.manifest['tensors'])} tensors)"
    )
    if key:
        typer.echo("signature: valid for the given key")
    elif (Path(bundle) / SIGNATURE).is_file():
        typer.echo("signature: present, NOT checked (pass --key to check it)")
    else:
        typer.echo("signature: none (the bundle is unsigned; nodes refuse unsigned bundles)")
    if digest is None:
        typer.echo("digest: not pinned (pass --digest to make sure this is the bundle you expect)")


def _bundle_key(value: str) -> bytes:
    """Raw Ed25519 public key from hex, a hex file or a PEM public key file."""
    from offsite.crypto import CryptoError, ed25519_public_key_from_pem

    text = value
    if Path(value).is_file():
        data = Path(value).read_bytes()
        if b"BEGIN PUBLIC KEY" in data:
            try:
                return ed25519_public_key_from_pem(data)
            except CryptoError:
                raise ConfigError(f"--key {value} is not an Ed25519 public key") from None
        text = data.decode("ascii", "replace").strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigError(
            "--key must be the 32-byte Ed25519 public key as 64 hex characters, or a file "
            "holding them or a PEM public key"
        )
    return raw


@app.command("eval")
def evaluate(
    run: Annotated[Path, typer.Argument(help="A run folder written by `offsite simulate`.")],
    round_: Annotated[
        int | None, typer.Option("--round", help="Evaluate this round's adapter (default: last).")
    ] = None,
    lm_eval: Annotated[
        bool,
        typer.Option(
            "--lm-eval",
            help="Also score the full and exported plug-in models with lm-evaluation-harness "
            "on the same held-out data (a local task file; no downloads).",
        ),
    ] = False,
) -> None:
    """Re-run the five-way evaluation of a finished run (optionally for an earlier round)."""
    _setup_logging(False)
    _quiet_libraries()
    from coordinator.workflow.rerun import evaluate_run

    evaluate_run(run, round_, lm_eval=lm_eval)


@app.command("export")
def export(
    run: Annotated[Path, typer.Argument(help="A run folder written by `offsite simulate`.")],
    round_: Annotated[
        int | None, typer.Option("--round", help="Export this round's adapter (default: last).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Target folder (default: RUN/export/round-N)."),
    ] = None,
) -> None:
    """Export a run's adapter: merged HF checkpoint, PEFT adapter (LoRA) and a model card.

    The merged folder loads with `AutoModelForCausalLM.from_pretrained`; the PEFT folder with
    `PeftModel.from_pretrained(original_model, folder)` and serving engines that load LoRA.
    """
    _setup_logging(False)
    _quiet_libraries()
    from coordinator.serve.export import export_run

    result = export_run(run, round_, out)
    typer.echo(f"merged checkpoint: {result.merged}")
    if result.peft:
        typer.echo(f"PEFT adapter:      {result.peft}")
    typer.echo(f"model card:        {result.card}")


@app.command("serve")
def serve(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Base model: catalog name, HF folder or cached id.")
    ] = "smollm2-135m",
    adapter: Annotated[
        list[str] | None,
        typer.Option("--adapter", "-a", help="NAME=PEFT_FOLDER to load at start (repeatable)."),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Interface to bind (loopback by default).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0 picks a free one and prints it).")] = 8000,
    served_name: Annotated[
        str | None, typer.Option(help="Model name clients use for the base model.")
    ] = None,
    max_prompt_tokens: Annotated[int, typer.Option(help="Longer prompts get HTTP 400.")] = 2048,
    max_body_bytes: Annotated[
        int, typer.Option(help="Larger request bodies get HTTP 413 (read no further).")
    ] = 1024 * 1024,
    admin_token_file: Annotated[
        Path | None,
        typer.Option(
            envvar="OFFSITE_ADMIN_TOKEN_FILE",
            help="File holding the token the adapter load/unload routes require (Bearer). "
            "Required when --host is not loopback.",
        ),
    ] = None,
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            envvar="OFFSITE_API_KEY_FILE",
            help="File holding the API key every model route requires (Bearer, as OpenAI "
            "clients send it).",
        ),
    ] = None,
) -> None:
    """Serve the full model over an OpenAI-compatible API; adapters are model names.

    Endpoints: /v1/models, /v1/completions and /v1/chat/completions (with "stream": true),
    and vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter to swap adapters at runtime.
    Beyond loopback an admin token is required for the adapter routes.
    Example: offsite serve -a bbc=runs/<run>/export/round-3/peft
    """
    import socket

    from offsite.host.network import is_loopback

    _setup_logging(False)
    admin_token = _secret(admin_token_file, "--admin-token-file")
    api_key = _secret(api_key_file, "--api-key-file")
    if not is_loopback(f"{host}:{port}") and not admin_token:
        raise ConfigError(
            f"--host {host} is reachable beyond this machine: pass --admin-token-file so only "
            "you can load and unload adapters (and --api-key-file to guard completions)"
        )
    if max_body_bytes < 1024 or max_prompt_tokens < 1:
        raise ConfigError("--max-body-bytes must be >= 1024 and --max-prompt-tokens >= 1")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as err:
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror}") from err
    _quiet_libraries()
    import uvicorn

    from coordinator.serve import Engine, build_app
    from offsite.catalog import resolve_model

    engine = Engine(resolve_model(model), served_name or Path(model).name, max_prompt_tokens)
    for spec in adapter or []:
        name, sep, path = spec.partition("=")
        if not sep:
            raise typer.BadParameter(f"--adapter {spec!r} must be NAME=PATH")
        engine.load_adapter(name, path)
    bound = listener.getsockname()[1]
    typer.echo(f"serving {engine.model_names()} on http://{host}:{bound}/v1", color=False)
    sys.stdout.flush()
    app_ = build_app(
        engine, admin_token=admin_token, api_key=api_key, max_body_bytes=max_body_bytes
    )
    server = uvicorn.Server(uvicorn.Config(app_, log_level="warning"))
    server.run(sockets=[listener])


@app.command("dashboard")
def dashboard(
    runs_dir: Annotated[
        Path, typer.Argument(help="Folder of simulation run folders (e.g. runs/).")
    ] = Path("runs"),
    bind: Annotated[
        str, typer.Option(help="HOST:PORT to serve on (loopback by default; port 0 picks one).")
    ] = "127.0.0.1:8480",
    token_file: Annotated[
        Path | None,
        typer.Option(
            help="File holding the admin token (or $OFFSITE_DASHBOARD_TOKEN); required beyond "
            "loopback, where it refuses to start without one (exit 14)."
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(help="TLS certificate (PEM) to serve HTTPS with; required beyond loopback."),
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(help="The TLS certificate's private key (PEM).")
    ] = None,
) -> None:
    """Browse simulation runs in a browser: rounds, losses, replies, five-way table, privacy.

    A coordinator serves the same pages over its registry with
    `offsite coordinator serve --dashboard 127.0.0.1:8480` (nodes, enrollment tokens, revocation).
    """
    from coordinator.dashboard.server import DashboardServer, admin_token, check_binding

    token = admin_token(token_file)
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("pass --tls-cert and --tls-key together (a certificate and its key)")
    tls = (tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
    for pem in tls or ():
        if not pem.is_file():
            raise ConfigError(f"{pem} is not a file; pass the PEM file of the certificate or key")
    # before heavy imports or listening
    check_binding(bind, token, "--bind", "--token-file", tls=tls is not None)
    if not runs_dir.is_dir():
        raise ConfigError(f"{runs_dir} is not a folder; pass the folder your runs are in")
    _quiet_libraries()
    from coordinator.dashboard.sources import RunsDirSource

    server = DashboardServer(RunsDirSource(runs_dir.resolve()), bind, token, tls)
    typer.echo(f"dashboard of {runs_dir} on {server.scheme}://{bind}", color=False)
    sys.stdout.flush()
    server.run()


def _secret(path: Path | None, option: str) -> str | None:
    """A token read from a file (never from argv, which every local user can list)."""
    from offsite.host.files import read_token

    if path is None:
        return None
    try:
        return read_token(path, option)
    except ValueError as err:
        raise ConfigError(str(err)) from err


@app.command()
def models() -> None:
    """List the embedded models (install offline; any local HF directory also works)."""
    from offsite.catalog import MODELS, model_cache_dir

    for m in MODELS.values():
        ready = "ready" if (model_cache_dir(m.name) / "config.json").is_file() else "not prepared"
        typer.echo(
            f"{m.name:14} {m.description}\n{'':14} license: {m.license}; {ready}; "
            f"install: {m.install}"
        )


@app.command()
def datasets() -> None:
    """List the embedded data sets (any JSONL file or folder-per-label also works)."""
    from offsite.catalog import DATASETS

    for d in DATASETS.values():
        typer.echo(
            f"{d.name:12} {d.description}\n{'':12} {d.kind}; license: {d.license}; "
            f"install: {d.install}"
        )


@app.command("prepare")
def prepare(
    names: Annotated[list[str], typer.Argument(help="Catalog model names to convert and cache.")],
) -> None:
    """Convert embedded models once into the local cache (`make setup` does this)."""
    _setup_logging(False)
    _quiet_libraries()
    from offsite.catalog import resolve_model

    for name in names:
        typer.echo(f"{name}: {resolve_model(name)}")


@app.command("config")
def show_config() -> None:
    """List every configuration key with its default and meaning."""
    from offsite.config import describe

    for key, default, text in describe():
        typer.echo(f"{key:26} = {default!r:16} {text}")


@bench_app.command("client")
def bench_client(
    steps: Annotated[int, typer.Option(help="Measured training steps per cell.")] = 5,
    warmup: Annotated[int, typer.Option(help="Discarded warm-up steps per cell.")] = 2,
    part: Annotated[
        str, typer.Option(help="'all', 'throughput' (speed and memory) or 'accuracy'.")
    ] = "all",
    fresh: Annotated[bool, typer.Option(help="Re-run cells that already finished.")] = False,
) -> None:
    """Offsite client vs full-model fine-tuning: tokens/s, peak RSS and plug-in accuracy of
    every update policy x {fp32, bf16, int8, int4}, on the default and a 48-block model.

    Writes bench/reports/client.{json,md,png}; finished cells are reused (takes hours in full:
    each accuracy cell is a default federated run).
    """
    arguments = ["--steps", str(steps), "--warmup", str(warmup), "--part", part]
    _run_bench_script("client_matrix.py", arguments + (["--fresh"] if fresh else []))


@bench_app.command("emulator")
def bench_emulator(
    cells: Annotated[
        str,
        typer.Option(
            help="Comma-separated cells of bench/emulator_transfer.py (`offsite bench emulator "
            "--cells x` lists them); empty = every cell."
        ),
    ] = "",
    seeds: Annotated[
        int, typer.Option(help="Seeds per cell (>= 3 for a confidence interval).")
    ] = 3,
    eval_size: Annotated[int, typer.Option(help="Held-out examples per run.")] = 500,
    fresh: Annotated[bool, typer.Option(help="Re-run runs that already finished.")] = False,
    generalisation: Annotated[
        bool,
        typer.Option(
            help="Also run the default on chatterbot-topics and on gemma3-270m (and the leading "
            "candidate on chatterbot-topics)."
        ),
    ] = False,
    tasks: Annotated[
        str,
        typer.Option(help="Only these generalisation entries, comma-separated (implies it)."),
    ] = "",
    score_only: Annotated[
        bool,
        typer.Option(
            help="Only add the gradient score to measured cells lacking it (builds their emulator)."
        ),
    ] = False,
    screen: Annotated[
        bool,
        typer.Option(
            help="Only screen the cells: build each emulator once and score it (the cheap "
            "proxy, minutes a cell), no federation; choose what the protocol runs next."
        ),
    ] = False,
) -> None:
    """Does the emulator transfer? The five-way protocol over seeds with 95 % confidence
    intervals: full zero-shot, emulator zero-shot, emulator fine-tuned, plug-in, full
    fine-tuning, the paired gaps, bundle bytes, verbatim middle tensors, build time, and the
    gradient score of each cell's bundle with its rank correlation to plug-in.

    Writes bench/reports/emulator_transfer.{json,md,png}; finished runs are reused, so it can stop
    and resume (each run is a whole default federated simulation: budget minutes per cell).
    """
    _run_bench_script(
        "emulator_transfer.py",
        (["--cells", cells] if cells else [])
        + ["--seeds", str(seeds), "--eval-size", str(eval_size)]
        + (["--fresh"] if fresh else [])
        + (["--generalisation"] if generalisation else [])
        + (["--tasks", tasks] if tasks else [])
        + (["--score-only"] if score_only else [])
        + (["--screen"] if screen else []),
    )


# offsite bench NAME [ARGS...] -> bench/SCRIPT, arguments passed through (its --help lists them);
# `client` and `emulator` above have typed options of their own.
BENCHMARKS = {
    "privacy": (
        "privacy_matrix.py",
        "The federation's privacy options (secure aggregation, DP at several ε) on the default "
        "run: plug-in accuracy and what each costs.",
    ),
    "inversion": (
        "inversion.py",
        "How much of a client's training data an honest-but-curious coordinator recovers from "
        "its update, with and without DP.",
    ),
    "transfer": (
        "transfer.py",
        "Artifact download vs one Flower message: the same bytes over loopback, time and memory.",
    ),
    "dashboard": (
        "dashboard.py",
        "Dashboard page loads (server and headless Chromium) with 1,000 nodes and 100 runs in "
        "the registry.",
    ),
    "privacy-population": (
        "privacy_population.py",
        "Client-level DP at 100, 300 and 1,000 clients per round and ε 8/4/1: plug-in vs "
        "clients per round, into bench/reports/privacy.md.",
    ),
    "exact-lora": (
        "lora_aggregation.py",
        "Exact vs naive LoRA aggregation (naive, merge-exact, frozen-A) at 16 and 100 clients "
        "per round: plug-in accuracy over seeds and the naive averaging error per round.",
    ),
    "recipe": (
        "recipe_tuning.py",
        "Choose the training recipe (lr, rank, rounds x steps) on tasks never reported: the "
        "default emulator's five-way scores per recipe on two tuning tasks, ranked by the share "
        "of full fine-tuning's gain the plug-in keeps on its worst task.",
    ),
    "worker-memory": (
        "worker_memory.py",
        "What one simulated client costs: peak and unshared RSS per Ray worker, 1 worker vs "
        "several, on a finished run's bundle.",
    ),
    "scale": (
        "scale.py",
        "Clients per round on one machine (4 to 256, tiny and default model): round time, peak "
        "RSS of the coordinator and of each worker, bytes per round.",
    ),
    "layer-drop": (
        "layer_drop.py",
        "How faithful the split is and what each cut costs, per catalog model.",
    ),
    "eval-speed": (
        "eval_speed.py",
        "How fast the five-way evaluation is, and whether each speed-up keeps fp32's decisions.",
    ),
    "gradient-score": (
        "gradient_score.py",
        "Does the training-free gradient score predict plug-in accuracy? A cheap emulator screen.",
    ),
    "serve": (
        "serve.py",
        "`offsite serve` latency and throughput with and without an adapter; hot-swap time.",
    ),
    "adapter-parts": (
        "adapter_parts.py",
        "Which part of a finished run's adapter transfers: bottom blocks only, top only, both.",
    ),
    "emulator-matrix": (
        "emulator_matrix.py",
        "Emulator construction: layer choice x distillation x weight precision, and size.",
    ),
}


def _add_benchmark(name: str, script: str, summary: str) -> None:
    def command(context: typer.Context) -> None:
        _run_bench_script(script, list(context.args))

    bench_app.command(
        name,
        help=f"{summary} Runs bench/{script}; `offsite bench {name} --help` shows its options.",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        add_help_option=False,
    )(command)


for _name, (_script, _summary) in BENCHMARKS.items():
    _add_benchmark(_name, _script, _summary)


def _run_bench_script(name: str, arguments: list[str]) -> None:
    import subprocess

    script = Path(__file__).resolve().parents[2] / "bench" / name
    if not script.is_file():
        raise OffsiteError(
            f"{script} not found: `offsite bench` runs from a source checkout of Offsite"
        )
    raise typer.Exit(subprocess.call([sys.executable, str(script), *arguments]))


def main() -> None:
    """Entry point: run the CLI and turn domain errors into one-line messages + exit codes."""
    try:
        app()
    except OffsiteError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(ExitCode.INTERRUPTED)


if __name__ == "__main__":
    main()
