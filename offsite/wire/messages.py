"""The coordinator ↔ client contract on the Flower plane, typed, in one module both roles import.

A train round sends each sampled node a ``TrainInstruction`` (a Flower ``ConfigRecord`` beside
the global adapter's arrays) and gets back a ``TrainReply`` (a ``MetricRecord`` beside the
trained arrays). Field ``some_name`` travels as the record key ``some-name``; only this module
spells those keys, so renaming a field renames it for both roles at once, and a record that
lacks a required key is refused with a ``MessageError`` that names it (two Offsite versions
that do not speak the same contract).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, TypeVar, Union

from flwr.app import ConfigRecord, MetricRecord

from offsite.errors import OffsiteError


class MessageError(OffsiteError, ValueError):
    """A Flower record that does not hold the message it should."""


def _key(name: str) -> str:
    return name.replace("_", "-")


NUM_EXAMPLES = _key("num_examples")  # FedAvg's ``weighted_by_key``: a reply's weight


_Message = TypeVar("_Message", bound="_Record")


def _convert(value: Any, kind: Any, key: str) -> Any:
    """``value`` as ``kind`` (int, float, str, bool, bytes, ``list[int]`` or ``X | None``), or
    MessageError."""
    if typing.get_origin(kind) in (Union, types.UnionType):
        if value is None:
            return None
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    try:
        if typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            return [item(v) for v in value]
        if kind is bool:
            return bool(int(value))
        return kind(value)
    except (TypeError, ValueError) as err:
        raise MessageError(f"message field '{key}' is {value!r}, not a {kind.__name__}") from err


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """A message class's resolved field types (resolving them costs ~1 ms: once per class)."""
    return typing.get_type_hints(cls)


class _Record:
    """Dataclass fields <-> hyphenated record keys; fields left at None are not sent."""

    def _items(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in fields(self):  # type: ignore[arg-type]  # subclasses are dataclasses
            value = getattr(self, field.name)
            if value is not None:
                out[_key(field.name)] = int(value) if isinstance(value, bool) else value
        return out

    @classmethod
    def _parse(cls: type[_Message], record: typing.Mapping[str, Any]) -> _Message:
        hints = _hints(typing.cast(type, cls))  # mypy: a TypeVar-bound class is hashable too
        values: dict[str, Any] = {}
        for field in fields(cls):  # type: ignore[arg-type]  # _Message is bound to the dataclasses below
            key = _key(field.name)
            if key in record:
                values[field.name] = _convert(record[key], hints[field.name], key)
            elif field.default is dataclasses.MISSING:
                raise MessageError(
                    f"{cls.__name__} lacks '{key}': the coordinator and this node run "
                    "different Offsite versions; install the same version on both"
                )
        return cls(**values)


@dataclass(frozen=True)
class TrainInstruction(_Record):
    """What a node needs to train one round (the adapter's tensors travel beside it)."""

    bundle_path: str  # simulation: where the verified bundle is on this machine
    bundle_digest: str
    data_dir: str  # simulation: the folder of client-<partition>.jsonl shares
    template: str
    max_words: int
    max_length: int
    batch_size: int
    local_steps: int
    lr: float
    precision: str
    seed: int
    bundle_artifact: str = ""  # deployment: the bundle's id on the artifact service
    upload: str = "dense"
    upload_fraction: float = 1.0
    memory_budget: str = ""
    threads: int = 0  # simulation: torch threads per client (0 = torch's default)
    dp_clip: float = 0.0  # differential privacy: clip each update to this norm (0 = off)
    dp_noise_std: float = 0.0  # under secure aggregation, each node's share of the noise
    proximal_mu: float = 0.0  # FedProx: weight of the proximal term (Flower's "proximal-mu")
    fault_attackers: int = 0  # robustness tests: partitions below this misbehave
    fault_attack: str = ""
    fault_scale: float = 0.0
    # "merge-exact": the arrays carry the adapter blocks' merged LoRA base weights and a fresh
    # LoRA; the node loads both and uploads its factors (ΔW densely under secure aggregation)
    lora_aggregation: str = "naive"
    client_ranks: str = ""  # simulation: LoRA rank of partition i is ranks[i % len] ("": global)
    server_round: int = 0  # stamped by the strategy (the run's round, across resumes)
    secagg_inbox: str = ""  # secure aggregation: this node's encrypted key shares

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(self._items())

    @classmethod
    def from_record(cls, record: ConfigRecord) -> TrainInstruction:
        return cls._parse(record)


def stamp_round(record: ConfigRecord, server_round: int) -> None:
    """Set the run's round number on an instruction record the strategy is sending."""
    record[_key("server_round")] = server_round


def with_secagg_inbox(record: ConfigRecord, inbox: str) -> ConfigRecord:
    """A copy of an instruction record addressed to one node under secure aggregation."""
    return ConfigRecord({**dict(record), _key("secagg_inbox"): inbox})


@dataclass(frozen=True)
class TrainReply(_Record):
    """What a node reports with its trained adapter. Under DP or secure aggregation only the
    fields that do not depend on the data leave the node (the weight is then 1)."""

    num_examples: int
    partition_id: int
    train_loss: float | None = None
    train_loss_last: float | None = None
    train_seconds: float | None = None
    train_tokens: int | None = None
    threads: int | None = None
    dp: bool | None = None  # the update is clipped (differential privacy)
    secagg: bool | None = None  # the arrays are a masked vector (secure aggregation)
    sparse_upload: bool | None = None  # the arrays are top-k changes against the global adapter
    upload_bytes: int | None = None
    # where the client ran (no DP, no secure aggregation): the worker process, its peak
    # resident memory so far, its anonymous (unshared) resident memory now, the frozen tensors
    # it maps from the host's one shared copy (client.shared_frozen), and in a Ray simulation
    # the first 48 bits of the Ray node's id
    worker_pid: int | None = None
    worker_peak_rss_mb: float | None = None
    worker_anon_rss_mb: float | None = None
    worker_shared_mb: float | None = None
    ray_node: int | None = None
    lora_rank: int | None = None  # the LoRA rank this node trained (merge-exact)

    def to_record(self) -> MetricRecord:
        return MetricRecord(self._items())

    @classmethod
    def from_record(cls, record: MetricRecord) -> TrainReply:
        return cls._parse(record)

    @classmethod
    def from_report(cls, report: typing.Mapping[str, Any]) -> TrainReply | None:
        """The reply inside one client report of a run's rounds log (the reply's metrics plus
        the server's verdict), or None when the node sent no metrics (an error, silence)."""
        try:
            return cls._parse(report)
        except MessageError:
            return None


SECAGG_RECORD = "secagg"  # the name of the secure-aggregation record in a query message


@dataclass(frozen=True)
class SecAggQuery(_Record):
    """One secure-aggregation stage the coordinator asks a node for (a Flower query message,
    ``offsite.federation.secagg`` the protocol): ``advertise`` keys, ``share`` keys, ``unmask``."""

    stage: str
    id: int = 0  # advertise: the node's protocol id (1..n)
    threshold: int = 0  # advertise: how many survivors the unmasking needs
    label: str = ""  # advertise: the round's label, which the keys are bound to
    peers: str = ""  # share: JSON [[id, cipher key hex, mask key hex], …]
    survivors: list[int] | None = None  # unmask: the protocol ids whose masked input arrived

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(self._items())

    @classmethod
    def from_record(cls, record: ConfigRecord) -> SecAggQuery:
        return cls._parse(record)


@dataclass(frozen=True)
class SecAggAnswer(_Record):
    """A node's answer to one ``SecAggQuery`` (the fields of its stage)."""

    cipher: bytes | None = None  # advertise: public key for the share ciphertexts
    mask: bytes | None = None  # advertise: public key for the pairwise masks
    shares: str | None = None  # share: JSON {peer id: ciphertext hex}
    self_masks: str | None = None  # unmask: JSON {id: share of a survivor's self mask}
    mask_keys: str | None = None  # unmask: JSON {id: share of a dropped node's mask key}

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(self._items())

    @classmethod
    def from_record(cls, record: ConfigRecord) -> SecAggAnswer:
        return cls._parse(record)
