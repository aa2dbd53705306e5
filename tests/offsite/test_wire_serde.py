"""Every protobuf message of the wire contract round-trips through the one serde module.

The cases are keyed by the messages the generated modules declare, so a message added to a
``.proto`` without a domain twin and a case here fails; every field of every case is set to a
non-default value, so a field the serde forgets fails too.
"""

from __future__ import annotations

import dataclasses

import pytest

from offsite.wire import serde
from offsite.wire.domain import (
    ArtifactStat,
    Chunk,
    DownloadRequest,
    EnrollGrant,
    EnrollRequest,
    RenewFlowerKeyReply,
    RenewFlowerKeyRequest,
    StatRequest,
)

CASES: dict[str, serde.WireValue] = {
    "offsite.v1.StatRequest": StatRequest("ab" * 32),
    "offsite.v1.StatResponse": ArtifactStat("cd" * 32, "bundle", 2**40 + 3, 4_128_768),
    "offsite.v1.DownloadRequest": DownloadRequest("ef" * 32, offset=2**33),
    "offsite.v1.Chunk": Chunk(offset=4_128_768, data=bytes(range(256)) * 3),
    "offsite.v1.EnrollRequest": EnrollRequest(
        token="one-time-token",
        node_name="clinic-a",
        csr_pem=b"-----BEGIN CERTIFICATE REQUEST-----\n...",
        flower_public_key=b"ecdsa-sha2-nistp384 AAAA",
    ),
    "offsite.v1.EnrollResponse": EnrollGrant(
        certificate_pem=b"-----BEGIN CERTIFICATE-----\nnode",
        ca_certificate_pem=b"-----BEGIN CERTIFICATE-----\nca",
        signing_public_key=bytes(range(32)),
        artifact_port=9302,
        superlink_port=9092,
        app_signing_public_key="ssh-ed25519 AAAA",
        app_signing_key_id="fpk_0f1e2d3c",
    ),
    "offsite.v1.RenewFlowerKeyRequest": RenewFlowerKeyRequest(b"ecdsa-sha2-nistp256 AAAA"),
    "offsite.v1.RenewFlowerKeyResponse": RenewFlowerKeyReply(renewed=True),
}


def _declared() -> dict[str, type]:
    """Every message class the generated modules declare, by full protobuf name."""
    found = {}
    for module in serde.PROTO_MODULES:
        for name, descriptor in module.DESCRIPTOR.message_types_by_name.items():
            found[descriptor.full_name] = getattr(module, name)
    return found


def test_every_message_has_a_codec_and_a_case() -> None:
    declared = _declared()
    assert set(CASES) == set(declared), "add a domain twin, a codec and a case for each message"
    assert {codec.proto for codec in serde.CODECS} == set(declared.values())


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_message_round_trips_through_bytes(name: str) -> None:
    value = CASES[name]
    message = serde.to_proto(value)
    assert message.DESCRIPTOR.full_name == name
    # every field travels: none was left at its default (which proto3 would not send)
    assert len(message.ListFields()) == len(message.DESCRIPTOR.fields)
    parsed = type(message).FromString(message.SerializeToString())
    assert serde.from_proto(parsed, type(value)) == value


@pytest.mark.parametrize("codec", serde.CODECS, ids=lambda c: c.domain.__name__)
def test_a_domain_twin_has_exactly_its_messages_fields(codec: serde.Codec[object]) -> None:
    fields = {f.name for f in dataclasses.fields(codec.domain)}
    assert fields == {f.name for f in codec.proto.DESCRIPTOR.fields}


def test_a_message_of_another_kind_is_refused() -> None:
    with pytest.raises(TypeError, match="not the protobuf form of Chunk"):
        serde.from_proto(serde.to_proto(StatRequest("ab" * 32)), Chunk)


def test_secrets_stay_out_of_reprs() -> None:
    text = repr(CASES["offsite.v1.EnrollRequest"])
    assert "one-time-token" not in text and "clinic-a" in text
