"""A data-owner node's identity: its keys (generated here, never sent), certificate and pins.

``offsite client join`` fetches the coordinator's certificate chain, pins the CA by the
fingerprint the coordinator's operator gave out of band, checks that this CA is a CA and signed
the certificate the server presents (before the token leaves the node), sends a CSR with the
one-time token and stores what comes back: the certificate, the CA, and the two coordinator
keys the node trusts from then on — the bundle-signing key (data it loads) and the app-signing
key (the only Flower app its SuperNode executes). From then on every call is mutual TLS.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from offsite.crypto import (
    CryptoError,
    EcPrivateKey,
    certificate_request,
    fingerprint,
    generate_ec_key,
    is_ca,
    openssh_private_key,
    openssh_public_key,
    ssh_fingerprint,
    verify_issued_by,
    write_private_key,
)
from offsite.errors import ExitCode, OffsiteError
from offsite.host.files import write_private
from offsite.wire.clients import EnrollmentClient, NodeClient
from offsite.wire.domain import EnrollRequest, RenewFlowerKeyRequest

IDENTITY_FILES = ("node.key", "node.pem", "ca.pem", "node.json", "flower.key", "flower.pub")


class JoinError(OffsiteError):
    exit_code = ExitCode.ENROLLMENT


@dataclass(frozen=True)
class NodeIdentity:
    folder: Path

    @property
    def key(self) -> Path:
        return self.folder / "node.key"

    @property
    def cert(self) -> Path:
        return self.folder / "node.pem"

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def info(self) -> Path:
        return self.folder / "node.json"

    @property
    def flower_key(self) -> Path:
        """SuperNode auth (OpenSSH)."""
        return self.folder / "flower.key"

    @property
    def flower_public_key(self) -> Path:
        return self.folder / "flower.pub"

    @property
    def trusted_entities(self) -> Path:
        return self.folder / "trusted-entities.yaml"

    def exists(self) -> bool:
        return self.key.is_file() and self.cert.is_file() and self.ca.is_file()

    def details(self) -> dict[str, Any]:
        """What the node recorded when it joined (``node.json``: addresses, pinned keys)."""
        if not self.info.is_file():
            raise JoinError(f"{self.folder} holds no node identity; run `offsite client join`")
        details: dict[str, Any] = json.loads(self.info.read_text())
        return details

    @property
    def artifact_address(self) -> str:
        return str(self.details()["artifacts"])

    def channel(self) -> grpc.Channel:
        """A mutual-TLS channel to the coordinator's artifact port."""
        return grpc.secure_channel(self.artifact_address, self.credentials())

    @property
    def superlink_address(self) -> str:
        address = str(self.details().get("superlink", ""))
        if not address:
            raise JoinError(
                f"the coordinator of {self.folder} runs no Flower SuperLink; pass --superlink"
            )
        return address

    def signing_key(self) -> bytes:
        return bytes.fromhex(self.details()["signing_public_key"])

    def app_signer(self) -> tuple[str, str]:
        """(Flower entity id, OpenSSH Ed25519 key) of the only app signer this node trusts."""
        details = self.details()
        key, key_id = details.get("app_signing_public_key"), details.get("app_signing_key_id")
        if not key or not key_id:
            raise JoinError(
                f"{self.folder} pins no app-signing key (it joined an older coordinator); join "
                "again into a new --state folder with a fresh token"
            )
        return str(key_id), str(key)

    def write_trusted_entities(self) -> Path:
        """Flower's ``--trusted-entities`` file: the pinned app-signing key, nothing else."""
        key_id, key = self.app_signer()
        self.trusted_entities.write_text(f"{key_id}: {json.dumps(key)}\n")
        return self.trusted_entities

    def credentials(self) -> grpc.ChannelCredentials:
        if not self.exists():
            raise JoinError(f"{self.folder} holds no node identity; run `offsite client join`")
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes(),
            certificate_chain=self.cert.read_bytes(),
        )

    def status(self) -> dict[str, str]:
        """What this node trusts and who it is, for ``offsite client status``."""
        details = self.details()
        key_id, app_key = self.app_signer()
        bundle_key = bytes.fromhex(details["signing_public_key"])
        return {
            "name": str(details["name"]),
            "coordinator": str(details["coordinator"]),
            "artifacts": str(details["artifacts"]),
            "superlink": str(details.get("superlink") or "none"),
            "CA fingerprint": str(details["ca_fingerprint"]),
            "certificate fingerprint": fingerprint(self.cert.read_bytes()),
            "bundle-signing key": "sha256:" + hashlib.sha256(bundle_key).hexdigest(),
            "app-signing key": f"{ssh_fingerprint(app_key)} ({key_id})",
            "Flower key": ssh_fingerprint(self.flower_public_key.read_text()),
        }


def server_chain(address: str, timeout: float = 10.0) -> list[bytes]:
    """The PEM certificates the server presents (unverified: the caller pins one)."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=host.strip("[]")) as tls,
    ):
        getter = getattr(tls, "get_unverified_chain", None)  # public from Python 3.13
        chain = getter() if getter else tls._sslobj.get_unverified_chain()  # type: ignore[attr-defined]  # private before 3.13
        pems = [c.public_bytes(ssl._ssl.ENCODING_PEM) for c in chain or []]  # type: ignore[attr-defined]  # typeshed lacks ssl._ssl
        return [p.encode() if isinstance(p, str) else p for p in pems]


def check_pinned_ca(ca_pem: bytes, leaf_pem: bytes) -> None:
    """The pinned certificate must be a CA and must have signed the server's leaf certificate;
    JoinError otherwise (checked before the token is sent)."""
    if not is_ca(ca_pem):
        raise JoinError(
            "the certificate with the pinned fingerprint is not a CA (no BasicConstraints CA); "
            "check the fingerprint with the coordinator's operator"
        )
    if fingerprint(leaf_pem) == fingerprint(ca_pem):
        raise JoinError("the coordinator presents its CA as its server certificate; refusing")
    try:
        verify_issued_by(leaf_pem, ca_pem)
    except CryptoError as err:
        raise JoinError(
            "the server's certificate was not issued by the pinned CA; this is not the "
            "coordinator you were given the fingerprint of"
        ) from err


def join(
    address: str,
    token: str,
    ca_fingerprint: str,
    name: str,
    folder: Path,
    timeout: float = 30.0,
) -> NodeIdentity:
    """Enroll this node with the coordinator at ``address``; returns the stored identity.

    Two keys are made here and never leave the node: the TLS client key (its certificate comes
    back from the coordinator) and the Flower SuperNode authentication key (its public half is
    registered with the coordinator's SuperLink). An existing identity is never overwritten.
    """
    identity = NodeIdentity(Path(folder))
    present = [f for f in IDENTITY_FILES if (identity.folder / f).exists()]
    if present:
        raise JoinError(
            f"{identity.folder} already holds a node identity ({', '.join(present)}); "
            "use another --state folder, or --exist-ok to keep it"
        )
    wanted = ca_fingerprint.lower().replace(":", "")
    try:
        chain = server_chain(address, timeout)
    except (OSError, ssl.SSLError) as err:
        raise JoinError(f"cannot reach the coordinator at {address} over TLS: {err}") from err
    ca = next((pem for pem in chain if fingerprint(pem) == wanted), None)
    if ca is None or not chain:
        raise JoinError(
            f"the coordinator at {address} does not present a CA with fingerprint {wanted}; "
            "check the fingerprint (`offsite coordinator init` prints it) and the address"
        )
    check_pinned_ca(ca, chain[0])
    key = generate_ec_key("secp256r1")
    flower_key = generate_ec_key("secp384r1")
    flower_public_key = openssh_public_key(flower_key)
    csr_pem = certificate_request(key, name)
    host = address.rpartition(":")[0].strip("[]")
    options = [("grpc.ssl_target_name_override", host)] if host else []
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    with grpc.secure_channel(address, credentials, options=options) as channel:
        try:
            reply = EnrollmentClient(channel).enroll(
                EnrollRequest(
                    token=token,
                    node_name=name,
                    csr_pem=csr_pem,
                    flower_public_key=flower_public_key,
                ),
                timeout=timeout,
            )
        except grpc.RpcError as err:
            raise JoinError(f"enrollment refused: {err.details()}") from err
    if fingerprint(reply.ca_certificate_pem) != wanted:
        raise JoinError("the coordinator answered with a CA other than the pinned one")
    if not reply.app_signing_public_key or not reply.app_signing_key_id:
        raise JoinError(
            "the coordinator sent no app-signing key, so this node could run no app; upgrade "
            "the coordinator's offsite"
        )
    identity.folder.mkdir(parents=True, exist_ok=True)
    identity.folder.chmod(0o700)
    write_private_key(identity.key, key)
    write_flower_key(identity, flower_key)
    identity.cert.write_bytes(reply.certificate_pem)
    identity.ca.write_bytes(reply.ca_certificate_pem)
    origin = address.rpartition(":")[0]
    identity.info.write_text(
        json.dumps(
            {
                "name": name,
                "coordinator": address,
                "artifacts": f"{origin}:{reply.artifact_port}",
                "superlink": f"{origin}:{reply.superlink_port}" if reply.superlink_port else "",
                "ca_fingerprint": wanted,
                "signing_public_key": reply.signing_public_key.hex(),
                "app_signing_public_key": reply.app_signing_public_key,
                "app_signing_key_id": reply.app_signing_key_id,
            },
            indent=1,
        )
    )
    identity.write_trusted_entities()
    return identity


def write_flower_key(identity: NodeIdentity, key: EcPrivateKey) -> None:
    """Store the SuperNode key pair (private 0600, atomically)."""
    write_private(identity.flower_key, openssh_private_key(key))
    identity.flower_public_key.write_bytes(openssh_public_key(key) + b"\n")


def renew_flower_key(identity: NodeIdentity, timeout: float = 30.0) -> bool:
    """Ask the coordinator (mutual TLS) to admit a fresh SuperNode key; True when it did and the
    node now uses it, False when the current key is still registered. A revoked node gets a
    JoinError that says so."""
    fresh = generate_ec_key("secp384r1")
    public = openssh_public_key(fresh)
    with identity.channel() as channel:
        try:
            reply = NodeClient(channel).renew_flower_key(
                RenewFlowerKeyRequest(flower_public_key=public), timeout=timeout
            )
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.PERMISSION_DENIED:
                raise RevokedError(
                    "the coordinator refused this node (revoked or not enrolled); ask its operator"
                ) from err
            raise JoinError(f"cannot renew the Flower key: {code.name}: {err.details()}") from err
    if reply.renewed:
        write_flower_key(identity, fresh)
    return bool(reply.renewed)


class RevokedError(JoinError):
    """The coordinator no longer accepts this node."""
