"""The data owner's Flower ClientApp: train the adapter on local data, return only the adapter.

Message in: ``arrays`` (global trainable tensors, full-model names) + ``config`` (a
``TrainInstruction``: bundle digest and location, training recipe). Message out: the trained
tensors + ``metrics`` (a ``TrainReply``: example count and training metrics). The emulator
never travels in a Flower message; it is read from the verified bundle on disk. Under
merge-exact aggregation the arrays also carry the adapter blocks' merged LoRA base weights, and
the node trains a fresh LoRA at its own rank on top of them (``client.merge_exact``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client import merge_exact
from client.node_config import DATA_PATH, IDENTITY_DIR, LORA_RANK, MEMORY_BUDGET, PARTITION_ID
from client.profile import anonymous_rss_bytes, peak_rss_bytes
from client.secure_stage import handle_query, masked_update
from client.session import open_session
from emulator.examples import training_batches
from emulator.forward import resolve_precision
from emulator.lora_merge import LORA_A
from emulator.train import train_adapter
from offsite.data import load_task
from offsite.federation.dp.mechanism import add_gaussian_noise, clip_update
from offsite.federation.sparse_update import encode_update
from offsite.wire.messages import SECAGG_RECORD, SecAggQuery, TrainInstruction, TrainReply

app = ClientApp()
RESIDUAL_KEY = "upload-residual"  # error-feedback residual of sparse upload, kept on the node


def _data_path(order: TrainInstruction, context: Context) -> Path:
    """Local data: ``data-path`` from the node config (deployment), else the simulation share."""
    if DATA_PATH in context.node_config:
        return Path(str(context.node_config[DATA_PATH]))
    partition = int(context.node_config[PARTITION_ID])
    return Path(order.data_dir) / f"client-{partition}.jsonl"


def _partition(context: Context) -> int:
    """The simulation's partition id; in deployment a number derived from the node's enrolled
    name, so a node's seeds and reports stay the same when Flower gives it a new node id (a
    renewed key, a coordinator restart): a resumed run then trains exactly as an uninterrupted
    one would."""
    if PARTITION_ID in context.node_config:
        return int(context.node_config[PARTITION_ID])
    identity_dir = context.node_config.get(IDENTITY_DIR)
    if identity_dir is not None:
        from client.identity import NodeIdentity

        name = str(NodeIdentity(Path(str(identity_dir))).details()["name"])
        return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % 1_000_003
    return int(context.node_id) % 1_000_003


def _bundle_path(order: TrainInstruction, context: Context) -> Path:
    """The run's verified bundle: in deployment fetched from the coordinator's artifact service
    into this node's locked cache (once per bundle), in simulation read where the plan says."""
    identity_dir = context.node_config.get(IDENTITY_DIR)
    artifact = order.bundle_artifact
    if identity_dir is None or not artifact:
        return Path(order.bundle_path)
    from client.artifacts import fetch_bundle
    from client.identity import NodeIdentity

    identity = NodeIdentity(Path(str(identity_dir)))
    with identity.channel() as channel:
        bundle = fetch_bundle(
            channel,
            artifact,
            order.bundle_digest,
            identity.folder / "cache",
            identity.signing_key(),
        )
    return bundle.path


def _set_threads(order: TrainInstruction) -> None:
    """Use the cores the simulation reserved for this client (0 = the torch default)."""
    threads = order.threads
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _memory_budget(order: TrainInstruction, context: Context) -> str:
    """This node's memory budget: node config ``memory-budget`` in deployment, else the run's
    ``train.memory_budget``; empty for none."""
    return str(context.node_config.get(MEMORY_BUDGET, order.memory_budget))


def _checkpointing(
    budget: str, order: TrainInstruction, context: Context, bundle_path: Path
) -> bool:
    """Activation checkpointing if this node's memory ``budget`` needs it."""
    if not budget:
        return False
    from client.budget import fit_budget
    from client.planner import Workload
    from emulator.bundle import read_manifest
    from emulator.forward import pick_device

    manifest = read_manifest(bundle_path)
    workload = Workload(
        str(bundle_path),
        str(_data_path(order, context)),
        batch_size=order.batch_size,
        max_length=order.max_length,
        max_words=order.max_words,
        template=order.template,
    )
    identity_dir = context.node_config.get(IDENTITY_DIR)
    fit = fit_budget(
        workload,
        str(manifest["adapter"]["kind"]),
        resolve_precision(order.precision, pick_device()),
        budget,
        order.bundle_digest,
        Path(str(identity_dir)) / "cache" if identity_dir else None,
    )
    return fit.checkpointing


@app.train()
def train(msg: Message, context: Context) -> Message:
    order = TrainInstruction.from_record(msg.content.config_records["config"])
    _set_threads(order)
    bundle_path = _bundle_path(order, context)
    budget = _memory_budget(order, context)
    checkpointing = _checkpointing(budget, order, context, bundle_path)
    global_state = msg.content.array_records["arrays"].to_torch_state_dict()
    partition = _partition(context)
    merge = order.lora_aggregation == "merge-exact"
    rank = _merge_rank(order, context, partition, global_state) if merge else 0
    session = open_session(
        bundle_path,
        order.bundle_digest,
        order.precision,
        checkpointing,
        lora_rank=rank,
        merge_exact=merge,
    )
    if merge:  # the round's merged base weights and fresh LoRA, cut to this node's rank
        start = merge_exact.start_round(session.adapted, global_state, rank)
    else:
        session.adapted.load_trainable(global_state)
        start = global_state

    task = load_task(str(_data_path(order, context)), min_labels=1)
    seed = order.seed * 100_003 + partition * 1_009 + order.server_round
    batches = training_batches(
        session.tokenizer,
        task.examples,
        order.template,
        max_words=order.max_words,
        max_length=order.max_length,
        batch_size=order.batch_size,
        seed=seed,
    )
    torch.manual_seed(seed)
    result = train_adapter(
        session.adapted,
        batches,
        steps=order.local_steps,
        lr=order.lr,
        precision=session.precision,
        device=session.device,
        proximal_mu=order.proximal_mu,
        **session.memory,
    )
    trained = misbehave(order, partition, start, session.adapted.trainable_state())
    clip = order.dp_clip
    if order.secagg_inbox:
        # Secure aggregation: only a masked [weight · update, weight] vector leaves the node
        # (under merge-exact the update is the dense ΔW of every LoRA module).
        if merge:
            update = merge_exact.deltas(session.adapted, trained, start)
        else:
            update = {k: trained[k] - global_state[k].float() for k in trained}
        weight = float(len(task.examples))
        if clip > 0:
            update, _ = clip_update(update, clip)
            frozen = session.adapted.spec.policy.frozen
            update = add_gaussian_noise(update, order.dp_noise_std, frozen=frozen)
            weight = 1.0
        arrays = masked_update(context.state, order.secagg_inbox, update, weight)
        reply = TrainReply(num_examples=1, partition_id=partition, secagg=True)
        return Message(RecordDict({"arrays": arrays, "metrics": reply.to_record()}), reply_to=msg)
    if clip > 0:
        # Differential privacy: only the clipped update leaves; metrics that depend on the
        # data (loss, example and token counts, timing) are withheld, since the noise covers
        # the update alone.
        if merge:  # B scaled: ΔW's norm is clipped, the factors still travel
            trained = merge_exact.clip_factors(session.adapted, trained, start, clip)
        else:
            update = {k: trained[k] - global_state[k].float() for k in trained}
            clipped, _ = clip_update(update, clip)
            trained = {k: global_state[k].float() + v for k, v in clipped.items()}
        reply = TrainReply(num_examples=1, partition_id=partition, dp=True)
    else:
        reply = TrainReply(
            num_examples=len(task.examples),
            partition_id=partition,
            train_loss=result.mean_loss,
            train_loss_last=result.losses[-1],
            train_seconds=result.seconds,
            train_tokens=result.tokens,
            threads=torch.get_num_threads(),
            worker_shared_mb=round(session.shared_bytes / 2**20, 1),
            **worker_facts(),
        )
    if merge:
        reply = replace(reply, lora_rank=rank)
    if order.upload == "sparse" and clip == 0:
        upload, sent_bytes = sparse_upload(context, trained, global_state, order.upload_fraction)
        reply = replace(reply, sparse_upload=True, upload_bytes=sent_bytes)
    else:
        upload = trained
    content = RecordDict({"arrays": ArrayRecord(upload), "metrics": reply.to_record()})
    return Message(content, reply_to=msg)


def worker_facts() -> dict[str, Any]:
    """Where this client ran, for its report: the worker process, its peak resident memory and
    its own (anonymous) resident memory now (the bundle is loaded once per worker, so clients
    served by one worker share that memory) and, in a Ray simulation, its Ray node (the first
    48 bits of the node id)."""
    facts: dict[str, Any] = {"worker_pid": os.getpid()}
    with contextlib.suppress(OSError, RuntimeError):  # no /proc (not Linux)
        facts["worker_peak_rss_mb"] = round(peak_rss_bytes() / 2**20, 1)
        facts["worker_anon_rss_mb"] = round(anonymous_rss_bytes() / 2**20, 1)
    ray = sys.modules.get("ray")  # never imported here: only a Ray worker has it loaded
    if ray is not None and ray.is_initialized():
        facts["ray_node"] = int(ray.get_runtime_context().get_node_id()[:12], 16)
    return facts


def _merge_rank(
    order: TrainInstruction, context: Context, partition: int, global_state: dict[str, torch.Tensor]
) -> int:
    """This node's LoRA rank under merge-exact (``client.merge_exact.node_rank``)."""
    ranks = [t.shape[0] for n, t in global_state.items() if n.endswith(LORA_A)]
    if not ranks:
        raise ValueError("a merge-exact round sent no LoRA factors")
    return merge_exact.node_rank(
        context.node_config.get(LORA_RANK), order.client_ranks, partition, max(ranks)
    )


def sparse_upload(
    context: Context,
    trained: dict[str, torch.Tensor],
    global_state: dict[str, torch.Tensor],
    fraction: float,
) -> tuple[dict[str, torch.Tensor], int]:
    """The changes to send and their size in bytes; what top-k held back stays in the node's
    state for the next round."""
    stored = context.state.array_records.get(RESIDUAL_KEY)
    residual = stored.to_torch_state_dict() if stored is not None else None
    arrays, kept, stats = encode_update(trained, global_state, fraction, residual)
    context.state[RESIDUAL_KEY] = ArrayRecord(kept)
    return arrays, stats.bytes_sent


def misbehave(
    order: TrainInstruction,
    partition: int,
    global_state: dict[str, torch.Tensor],
    trained: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Injected faults (``[faults]``, for robustness tests): honest clients pass through."""
    if partition >= order.fault_attackers:
        return trained
    attack = order.fault_attack
    if attack == "crash":
        raise RuntimeError(f"injected crash of client {partition}")
    if attack == "nan":
        first = next(iter(trained))
        return {**trained, first: torch.full_like(trained[first], float("nan"))}
    factor = order.fault_scale * (-1.0 if attack == "sign-flip" else 1.0)
    return {
        k: global_state[k].float() + factor * (v - global_state[k].float())
        for k, v in trained.items()
    }


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Secure aggregation stages (advertise keys, share keys, unmask)."""
    query = SecAggQuery.from_record(msg.content.config_records[SECAGG_RECORD])
    answer = handle_query(query, context.state)
    return Message(RecordDict({SECAGG_RECORD: answer.to_record()}), reply_to=msg)
