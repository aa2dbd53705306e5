"""The coordinator's side of secure aggregation over Flower messages.

A secure round wraps the ordinary train exchange in the protocol of ``offsite.federation.secagg``:
two query exchanges before training (advertise keys, share keys; the encrypted shares for each
client travel inside its train message) and one after (unmask). Clients reply to the train
message with a masked vector ``[Σ w·Δ, w]`` (update times weight, then the weight), so the
coordinator learns only the weighted sum of the updates and the sum of the weights.

Each masked vector is folded into the running sum as its reply arrives (``fold_masked``), so the
coordinator holds one vector whatever the number of clients; 100 clients with 15 dropouts at the
default threshold take seconds at protocol level (``tests/offsite/test_secagg.py``). Ours, not
Flower's ``SecAggPlusWorkflow``: that one runs only in Flower's legacy ``NumPyClient`` stack
(measured here: 37 s a round there vs 20 s plain, in deployment), not the Message API.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from offsite.federation.secagg import (
    Advertise,
    EncryptedShares,
    MaskedInput,
    SecAggError,
    SecAggServer,
    UnmaskShares,
    decode,
)
from offsite.wire.messages import SECAGG_RECORD, MessageError, SecAggAnswer, SecAggQuery


def default_threshold(clients: int) -> int:
    """A strict majority and at least two thirds of the round's clients."""
    return max(clients // 2 + 1, math.ceil(2 * clients / 3))


@dataclass
class SecureRound:
    server: SecAggServer
    ids: dict[int, int]  # Flower node id -> protocol id (1..n)
    inbox: dict[int, str]  # Flower node id -> JSON of the encrypted shares addressed to it
    grid: Grid
    timeout: float | None

    @property
    def nodes(self) -> dict[int, int]:
        return {i: node for node, i in self.ids.items()}


def _query(node: int, query: SecAggQuery) -> Message:
    record = RecordDict({SECAGG_RECORD: query.to_record()})
    return Message(content=record, dst_node_id=node, message_type=MessageType.QUERY)


def _answers(replies: Iterable[Message]) -> list[tuple[int, SecAggAnswer]]:
    """(node, answer) of every reply that holds one; an error or a malformed record is a node
    that dropped out of the round (the protocol tolerates that down to its threshold)."""
    out = []
    for reply in replies:
        if reply.has_error() or SECAGG_RECORD not in reply.content.config_records:
            continue
        try:
            answer = SecAggAnswer.from_record(reply.content.config_records[SECAGG_RECORD])
        except MessageError:
            continue
        out.append((reply.metadata.src_node_id, answer))
    return out


def setup_round(
    grid: Grid,
    nodes: Sequence[int],
    threshold: int,
    label: str,
    timeout: float | None,
) -> SecureRound:
    """Advertise and share keys among ``nodes``; raises ``SecAggError`` when too few take part."""
    server = SecAggServer(len(nodes), threshold, label.encode())
    ids = {node: index for index, node in enumerate(sorted(nodes), start=1)}
    replies = grid.send_and_receive(
        [
            _query(node, SecAggQuery("advertise", id=ids[node], threshold=threshold, label=label))
            for node in ids
        ],
        timeout=timeout,
    )
    advertised = [
        Advertise(ids[node], answer.cipher, answer.mask)
        for node, answer in _answers(replies)
        if node in ids and answer.cipher is not None and answer.mask is not None
    ]
    peers = server.collect_keys(advertised)
    listing = json.dumps([[a.client, a.cipher_public.hex(), a.mask_public.hex()] for a in peers])
    by_id = {a.client for a in peers}
    replies = grid.send_and_receive(
        [_query(node, SecAggQuery("share", peers=listing)) for node in ids if ids[node] in by_id],
        timeout=timeout,
    )
    shares = []
    for node, answer in _answers(replies):
        if node not in ids or answer.shares is None:
            continue
        try:
            boxes = {int(k): bytes.fromhex(v) for k, v in json.loads(answer.shares).items()}
        except (ValueError, TypeError, AttributeError):
            continue  # malformed: this node dropped out
        shares.append(EncryptedShares(ids[node], boxes))
    inbox = server.route_shares(shares)
    nodes_by_id = {i: node for node, i in ids.items()}
    return SecureRound(
        server,
        ids,
        {
            nodes_by_id[i]: json.dumps({str(k): v.hex() for k, v in box.items()})
            for i, box in inbox.items()
        },
        grid,
        timeout,
    )


def fold_masked(
    secure: SecureRound, node: int, vector: np.ndarray, adapter_size: int | None = None
) -> str | None:
    """Fold ``node``'s masked vector into the round's sum as it arrives (the coordinator holds
    one vector, whatever the number of clients); why it cannot count, or None.

    ``adapter_size`` (values in the global adapter) refuses a vector of another length before
    it is folded; without it the first vector's length would decide, and one faulty node
    answering first would make every honest vector after it "differ in length"."""
    if node not in secure.ids:
        return "not a node of this secure round"
    if adapter_size is not None and vector.size != adapter_size + 1:
        return (
            f"masked vector has {vector.size} values, expected {adapter_size + 1} (the "
            "adapter's values and the weight)"
        )
    try:
        secure.server.add_masked(MaskedInput(secure.ids[node], vector))
    except SecAggError as err:
        return str(err)
    return None


def finish_round(
    secure: SecureRound, global_state: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], int]:
    """Unmask the weighted update sum of the folded vectors; the new global state and how many
    clients it covers."""
    survivors = secure.server.close_masking()
    nodes = secure.nodes
    replies = secure.grid.send_and_receive(
        [_query(nodes[i], SecAggQuery("unmask", survivors=list(survivors))) for i in survivors],
        timeout=secure.timeout,
    )
    answers = []
    for node, answer in _answers(replies):
        if node not in secure.ids or answer.self_masks is None or answer.mask_keys is None:
            continue
        try:
            own = {int(k): int(v) for k, v in json.loads(answer.self_masks).items()}
            keys = {int(k): int(v) for k, v in json.loads(answer.mask_keys).items()}
        except (ValueError, TypeError, AttributeError):
            continue  # malformed: this node dropped out
        answers.append(UnmaskShares(secure.ids[node], own, keys))
    total = decode(secure.server.unmask(answers))
    weight = float(total[-1])
    if weight <= 0:
        raise SecAggError(f"the summed client weight is {weight}; no usable update")
    state = apply_mean_update(global_state, total[:-1] / weight)
    return state, len(survivors)


def flatten_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted(state)


def apply_mean_update(
    global_state: Mapping[str, torch.Tensor], mean: np.ndarray
) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name in flatten_names(global_state):
        tensor = global_state[name]
        size = tensor.numel()
        delta = torch.from_numpy(mean[offset : offset + size].copy()).reshape(tensor.shape)
        out[name] = (tensor.double() + delta).to(tensor.dtype)
        offset += size
    if offset != mean.size:
        raise SecAggError(f"the unmasked sum has {mean.size} values, the adapter {offset}")
    return out
