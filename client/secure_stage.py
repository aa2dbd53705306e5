"""A client's side of secure aggregation over Flower messages (see ``offsite.federation.secagg``).

The protocol state (private keys, received shares) lives in the node's ``context.state`` between
the query messages and the train message of one round, never in a message to the coordinator.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from offsite.federation.secagg import Advertise, SecAggClient
from offsite.wire.messages import SecAggAnswer, SecAggQuery

STATE_KEY = "secagg-state"


def _load(state: RecordDict) -> SecAggClient:
    if STATE_KEY not in state.config_records:
        raise ValueError("secure aggregation message arrived before key advertisement")
    return SecAggClient.restore(str(state.config_records[STATE_KEY]["json"]))


def _save(state: RecordDict, client: SecAggClient) -> None:
    state.config_records[STATE_KEY] = ConfigRecord({"json": client.export()})


def handle_query(query: SecAggQuery, state: RecordDict) -> SecAggAnswer:
    """Answer one protocol stage (advertise, share, unmask)."""
    if query.stage == "advertise":
        client = SecAggClient(query.id, query.threshold, query.label.encode())
        advertised = client.advertise()
        _save(state, client)
        return SecAggAnswer(cipher=advertised.cipher_public, mask=advertised.mask_public)
    client = _load(state)
    if query.stage == "share":
        peers = [
            Advertise(int(i), bytes.fromhex(c), bytes.fromhex(m))
            for i, c, m in json.loads(query.peers)
        ]
        shares = client.share(peers)
        _save(state, client)
        return SecAggAnswer(
            shares=json.dumps({str(k): v.hex() for k, v in shares.ciphertexts.items()})
        )
    if query.stage == "unmask":
        answer = client.unmask(list(query.survivors or []))
        _save(state, client)
        return SecAggAnswer(
            self_masks=json.dumps({str(k): str(v) for k, v in answer.self_mask.items()}),
            mask_keys=json.dumps({str(k): str(v) for k, v in answer.mask_key.items()}),
        )
    raise ValueError(f"unknown secure aggregation stage {query.stage!r}")


def masked_update(
    state: RecordDict,
    inbox_json: str,
    update: Mapping[str, torch.Tensor],
    weight: float,
) -> ArrayRecord:
    """``[weight · update (tensors in name order), weight]``, masked for the secure sum."""
    flat = np.concatenate(
        [update[name].double().reshape(-1).numpy() * weight for name in sorted(update)]
        + [np.array([weight], dtype=np.float64)]
    )
    client = _load(state)
    inbox = {int(k): bytes.fromhex(v) for k, v in json.loads(inbox_json).items()}
    masked = client.mask(inbox, flat)
    _save(state, client)
    return ArrayRecord({"masked": Array(masked.vector)})
