"""A data-owner node's identity: its key (generated here, never sent), certificate and CA.

``offsite client join`` fetches the coordinator's certificate chain, pins the CA by the
fingerprint the coordinator's operator gave out of band, sends a CSR with the one-time token and
stores the returned certificate. From then on every call is mutual TLS.
"""

from __future__ import annotations

import json
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from offsite.certs import fingerprint
from offsite.errors import OffsiteError
from offsite.files import write_private
from offsite.wire.v1 import enrollment_pb2, enrollment_pb2_grpc


class JoinError(OffsiteError):
    exit_code = 5


@dataclass(frozen=True)
class NodeIdentity:
    folder: Path

    key = property(lambda self: self.folder / "node.key")
    cert = property(lambda self: self.folder / "node.pem")
    ca = property(lambda self: self.folder / "ca.pem")
    info = property(lambda self: self.folder / "node.json")
    flower_key = property(lambda self: self.folder / "flower.key")  # SuperNode auth (OpenSSH)
    flower_public_key = property(lambda self: self.folder / "flower.pub")

    def exists(self) -> bool:
        return self.key.is_file() and self.cert.is_file() and self.ca.is_file()

    def details(self) -> dict:
        return json.loads(self.info.read_text())

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

    def credentials(self) -> grpc.ChannelCredentials:
        if not self.exists():
            raise JoinError(f"{self.folder} holds no node identity; run `offsite client join`")
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes(),
            certificate_chain=self.cert.read_bytes(),
        )


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
        chain = getter() if getter else tls._sslobj.get_unverified_chain()  # type: ignore[union-attr]
        pems = [c.public_bytes(ssl._ssl.ENCODING_PEM) for c in chain or []]  # type: ignore[attr-defined]
        return [p.encode() if isinstance(p, str) else p for p in pems]


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
    registered with the coordinator's SuperLink).
    """
    identity = NodeIdentity(Path(folder))
    wanted = ca_fingerprint.lower().replace(":", "")
    try:
        chain = server_chain(address, timeout)
    except (OSError, ssl.SSLError) as err:
        raise JoinError(f"cannot reach the coordinator at {address} over TLS: {err}") from err
    ca = next((pem for pem in chain if fingerprint(pem) == wanted), None)
    if ca is None:
        raise JoinError(
            f"the coordinator at {address} does not present a CA with fingerprint {wanted}; "
            "check the fingerprint (`offsite coordinator init` prints it) and the address"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    flower_key = ec.generate_private_key(ec.SECP384R1())
    flower_public_key = flower_key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    host = address.rpartition(":")[0].strip("[]")
    options = [("grpc.ssl_target_name_override", host)] if host else []
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    with grpc.secure_channel(address, credentials, options=options) as channel:
        stub = enrollment_pb2_grpc.EnrollmentServiceStub(channel)
        try:
            reply = stub.Enroll(
                enrollment_pb2.EnrollRequest(
                    token=token,
                    node_name=name,
                    csr_pem=csr.public_bytes(serialization.Encoding.PEM),
                    flower_public_key=flower_public_key,
                ),
                timeout=timeout,
            )
        except grpc.RpcError as err:
            raise JoinError(f"enrollment refused: {err.details()}") from err  # type: ignore[attr-defined]
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(identity.key, key_pem)
    write_private(
        identity.flower_key,
        flower_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    identity.flower_public_key.write_bytes(flower_public_key + b"\n")
    identity.cert.write_bytes(reply.certificate_pem)
    if fingerprint(reply.ca_certificate_pem) != wanted:
        raise JoinError("the coordinator answered with a CA other than the pinned one")
    identity.ca.write_bytes(reply.ca_certificate_pem)
    identity.info.write_text(
        json.dumps(
            {
                "name": name,
                "coordinator": address,
                "artifacts": f"{address.rpartition(':')[0]}:{reply.artifact_port}",
                "superlink": (
                    f"{address.rpartition(':')[0]}:{reply.superlink_port}"
                    if reply.superlink_port
                    else ""
                ),
                "ca_fingerprint": wanted,
                "signing_public_key": reply.signing_public_key.hex(),
            },
            indent=1,
        )
    )
    return identity
