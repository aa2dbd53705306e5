"""The Flower-plane contract: every message type round-trips through its Flower record, a
record missing a field is refused by name, and no role spells a message key itself."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, MetricRecord

from offsite.wire.messages import (
    MessageError,
    SecAggAnswer,
    SecAggQuery,
    TrainInstruction,
    TrainReply,
    stamp_round,
    with_secagg_inbox,
)

ROOT = Path(__file__).resolve().parents[2]
# the Flower messages, and the SuperNode's node config (``data-path``, ``memory-budget``…)
CONTRACTS = {ROOT / "offsite" / "wire" / "messages.py", ROOT / "client" / "node_config.py"}

INSTRUCTION = TrainInstruction(
    bundle_path="/runs/r/bundle",
    bundle_digest="ab" * 32,
    data_dir="/runs/r/data",
    template="Text: {text}\nTopic:",
    max_words=200,
    max_length=256,
    batch_size=8,
    local_steps=20,
    lr=3e-4,
    precision="bf16",
    seed=7,
    bundle_artifact="sha256-ab",
    upload="sparse",
    upload_fraction=0.1,
    memory_budget="2GiB",
    threads=2,
    dp_clip=1.5,
    dp_noise_std=0.25,
    fault_attackers=1,
    fault_attack="sign-flip",
    fault_scale=3.0,
    server_round=4,
    secagg_inbox="c2VjcmV0",
)


def test_a_train_instruction_round_trips_through_its_config_record() -> None:
    record = INSTRUCTION.to_record()
    assert isinstance(record, ConfigRecord)
    assert TrainInstruction.from_record(record) == INSTRUCTION
    # every field is sent (a default one too), under its hyphenated key
    assert set(record) == {f.name.replace("_", "-") for f in dataclasses.fields(TrainInstruction)}


@pytest.mark.parametrize(
    "reply",
    [
        TrainReply(
            num_examples=37,
            partition_id=2,
            train_loss=1.25,
            train_loss_last=0.75,
            train_seconds=3.5,
            train_tokens=4096,
            threads=1,
            sparse_upload=True,
            upload_bytes=1234,
        ),
        TrainReply(num_examples=1, partition_id=0, dp=True),
        TrainReply(num_examples=1, partition_id=5, secagg=True),
    ],
)
def test_every_train_reply_round_trips_and_sends_only_what_it_has(reply: TrainReply) -> None:
    record = reply.to_record()
    assert isinstance(record, MetricRecord)
    assert TrainReply.from_record(record) == reply
    sent = {f.name for f in dataclasses.fields(reply) if getattr(reply, f.name) is not None}
    assert set(record) == {name.replace("_", "-") for name in sent}
    # the rounds log keeps the reply's metrics beside the server's verdict
    report = {"round": 3, "node-id": 99, "quarantined": "update norm too large", **dict(record)}
    assert TrainReply.from_report(report) == reply


def test_a_record_missing_a_field_is_refused_by_name() -> None:
    record = INSTRUCTION.to_record()
    del record["local-steps"]
    with pytest.raises(MessageError, match=r"lacks 'local-steps'.*same version"):
        TrainInstruction.from_record(record)
    with pytest.raises(MessageError, match="lacks 'partition-id'"):
        TrainReply.from_record(MetricRecord({"num-examples": 3}))
    assert TrainReply.from_report({"round": 1, "node-id": 4, "error": "died"}) is None


def test_a_field_of_the_wrong_type_is_refused() -> None:
    record = INSTRUCTION.to_record()
    record["batch-size"] = "eight"
    with pytest.raises(MessageError, match="'batch-size' is 'eight', not a int"):
        TrainInstruction.from_record(record)


def test_the_strategy_stamps_the_round_and_addresses_secure_aggregation_inboxes() -> None:
    record = dataclasses.replace(INSTRUCTION, server_round=0, secagg_inbox="").to_record()
    stamp_round(record, 12)
    node = with_secagg_inbox(record, "aW5ib3g=")
    assert TrainInstruction.from_record(node).server_round == 12
    assert TrainInstruction.from_record(node).secagg_inbox == "aW5ib3g="
    assert TrainInstruction.from_record(record).secagg_inbox == ""  # the shared one is unchanged


@pytest.mark.parametrize(
    "message",
    [
        SecAggQuery("advertise", id=3, threshold=2, label="round-1-ab"),
        SecAggQuery("share", peers='[[1, "aa", "bb"]]'),
        SecAggQuery("unmask", survivors=[1, 3, 4]),
        SecAggAnswer(cipher=b"\x01" * 32, mask=b"\x02" * 32),
        SecAggAnswer(shares='{"2": "ff"}'),
        SecAggAnswer(self_masks='{"1": "7"}', mask_keys="{}"),
    ],
)
def test_every_secure_aggregation_message_round_trips(message: SecAggQuery | SecAggAnswer) -> None:
    record = message.to_record()
    assert isinstance(record, ConfigRecord)
    assert type(message).from_record(record) == message


def test_no_role_spells_a_message_key_outside_the_messages_module() -> None:
    keys = {
        f.name.replace("_", "-")
        for message in (TrainInstruction, TrainReply, SecAggQuery, SecAggAnswer)
        for f in dataclasses.fields(message)
        if "_" in f.name  # one-word keys ("lr", "seed", "dp") are too common to police
    }
    alternatives = "|".join(map(re.escape, sorted(keys)))
    pattern = re.compile(rf"""["']({alternatives})["']""")
    found = []
    for package in ("client", "coordinator", "emulator", "offsite"):
        for path in (ROOT / package).rglob("*.py"):
            if path in CONTRACTS or "_pb2" in path.name:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if hit := pattern.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {hit.group(1)}")
    assert not found, "message keys spelled outside offsite/wire/messages.py:\n" + "\n".join(found)
