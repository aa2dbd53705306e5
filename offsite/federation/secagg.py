"""Secure aggregation (Bonawitz et al. 2017, double masking) for adapter updates.

The coordinator learns the *sum* of the clients' vectors and nothing else about any one of them,
and the sum survives clients dropping out as long as at least ``threshold`` stay.

Protocol, one federated round (messages are plain dataclasses; transport is the caller's):

1. advertise: each client makes two X25519 key pairs (one to encrypt key shares, one to agree
   pairwise masks) and publishes both public keys.
2. share: each client draws a self-mask seed ``b``, Shamir-shares ``b`` and its mask private key
   (``threshold``-of-n over GF(2^521 - 1)) and sends every peer its shares encrypted with
   AES-GCM under an HKDF key from their X25519 agreement (the server only routes ciphertexts).
3. mask: each client encodes its vector as fixed-point integers mod 2^64, adds PRG(b) and, for
   every peer j that shared, ±PRG(s_ij) (+ if i < j, - if i > j) where s_ij is the pairwise
   X25519 secret; PRG = AES-256-CTR keyed by HKDF(seed, round).
4. unmask: the server names who sent a masked vector; each survivor returns the shares of ``b``
   for survivors and of the mask key for dropped clients — never both for one client (checked).
   With ≥ ``threshold`` answers the server removes the self-masks and the dropped clients'
   pairwise masks; with fewer it aborts and learns nothing.

Fixed point: ``FRACTION_BITS`` fractional bits, two's complement in 64 bits, so a float sum is
exact to n × 2^-(FRACTION_BITS+1) as long as |sum| < 2^(63 - FRACTION_BITS). Integers are exact.
Masks come from AES-CTR on OS-random keys, never from ``numpy.random``.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from offsite.crypto import (
    AgreementKey,
    aead_decrypt,
    aead_encrypt,
    aes_ctr_keystream,
    agree,
    agreement_key_from_bytes,
    agreement_private_bytes,
    agreement_public_bytes,
    generate_agreement_key,
    hkdf_sha256,
)

FRACTION_BITS = 24
PRIME = 2**521 - 1  # Mersenne prime: holds a 32-byte secret


class SecAggError(RuntimeError):
    """The protocol cannot continue safely (too few clients, bad message); no result."""


def check_setup(clients: int, threshold: int) -> None:
    """Refuse configurations that are unsafe or cannot survive a dropout."""
    if clients < 3:
        raise SecAggError("secure aggregation needs at least 3 clients per round")
    if threshold <= clients // 2:
        raise SecAggError(
            f"threshold {threshold} must exceed half of the {clients} clients, or a server "
            "could collect both the self-mask and the mask-key shares of one client"
        )
    if threshold > clients:
        raise SecAggError(f"threshold {threshold} exceeds the {clients} clients")


# ---------------------------------------------------------------- primitives


def prg(seed: bytes, length: int, label: bytes) -> np.ndarray:
    """``length`` pseudo-random uint64 values from a 32-byte seed (AES-256-CTR)."""
    key = hkdf_sha256(seed, b"offsite-secagg-prg|" + label)
    stream = aes_ctr_keystream(key, 8 * length)
    values: np.ndarray = np.frombuffer(stream, dtype="<u8").copy()
    return values


def share_secret(secret: bytes, holders: Sequence[int], threshold: int) -> dict[int, int]:
    """Shamir shares of ``secret`` for ``holders`` (non-zero ids); any ``threshold`` recover it."""
    value = int.from_bytes(secret, "big")
    if value >= PRIME:
        raise ValueError("secret too large for the field")
    coefficients = [value] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for holder in holders:
        x, acc = holder, 0
        for coefficient in reversed(coefficients):
            acc = (acc * x + coefficient) % PRIME
        shares[holder] = acc
    return shares


def recover_secret(shares: Mapping[int, int], threshold: int, length: int = 32) -> bytes:
    """The secret from at least ``threshold`` shares (Lagrange interpolation at 0)."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares cannot recover a {threshold}-threshold secret")
    points = list(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                numerator = numerator * (-xj) % PRIME
                denominator = denominator * (xi - xj) % PRIME
        secret = (secret + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    return secret.to_bytes(length, "big")


def encode(values: np.ndarray) -> np.ndarray:
    """Floats → fixed-point uint64 (two's complement)."""
    scaled = np.rint(np.asarray(values, dtype=np.float64) * (1 << FRACTION_BITS))
    limit = 2.0**63
    if np.abs(scaled).max(initial=0) >= limit:
        raise SecAggError("a value is too large for the fixed-point encoding; clip updates first")
    return scaled.astype(np.int64).view(np.uint64)


def decode(values: np.ndarray) -> np.ndarray:
    return values.view(np.int64).astype(np.float64) / (1 << FRACTION_BITS)


def _pair_seed(private: AgreementKey, public: bytes) -> bytes:
    return hkdf_sha256(agree(private, public), b"pair-mask")


# ---------------------------------------------------------------- messages


@dataclass(frozen=True)
class Advertise:
    client: int
    cipher_public: bytes
    mask_public: bytes


@dataclass(frozen=True)
class EncryptedShares:
    sender: int
    ciphertexts: dict[int, bytes]  # recipient -> nonce + AES-GCM(ciphertext)


@dataclass(frozen=True)
class MaskedInput:
    client: int
    vector: np.ndarray  # uint64


@dataclass(frozen=True)
class UnmaskShares:
    client: int
    self_mask: dict[int, int]  # survivor -> its share of b
    mask_key: dict[int, int]  # dropped -> its share of the mask private key


# ---------------------------------------------------------------- client


@dataclass
class SecAggClient:
    """One client's side of one round. ``client`` ids are 1..n (Shamir x-coordinates)."""

    client: int
    threshold: int
    round_label: bytes
    _cipher_key: AgreementKey = field(default_factory=generate_agreement_key)
    _mask_key: AgreementKey = field(default_factory=generate_agreement_key)
    _self_seed: bytes = field(default_factory=lambda: os.urandom(32))
    _peers: dict[int, Advertise] = field(default_factory=dict)
    _held: dict[int, tuple[int, int]] = field(default_factory=dict)  # sender -> (b, key) shares
    _sharers: list[int] = field(default_factory=list)
    _answered: bool = False

    def export(self) -> str:
        """This client's round state as JSON (it holds private keys: keep it on the node)."""
        return json.dumps(
            {
                "client": self.client,
                "threshold": self.threshold,
                "round_label": self.round_label.hex(),
                "cipher_key": agreement_private_bytes(self._cipher_key).hex(),
                "mask_key": agreement_private_bytes(self._mask_key).hex(),
                "self_seed": self._self_seed.hex(),
                "peers": [
                    [a.client, a.cipher_public.hex(), a.mask_public.hex()]
                    for a in self._peers.values()
                ],
                "held": {str(k): [str(b), str(key)] for k, (b, key) in self._held.items()},
                "sharers": self._sharers,
                "answered": self._answered,
            }
        )

    @classmethod
    def restore(cls, text: str) -> SecAggClient:
        data = json.loads(text)
        client = cls(
            int(data["client"]),
            int(data["threshold"]),
            bytes.fromhex(data["round_label"]),
            agreement_key_from_bytes(bytes.fromhex(data["cipher_key"])),
            agreement_key_from_bytes(bytes.fromhex(data["mask_key"])),
            bytes.fromhex(data["self_seed"]),
        )
        client._peers = {
            int(i): Advertise(int(i), bytes.fromhex(c), bytes.fromhex(m))
            for i, c, m in data["peers"]
        }
        client._held = {int(k): (int(b), int(key)) for k, (b, key) in data["held"].items()}
        client._sharers = [int(i) for i in data["sharers"]]
        client._answered = bool(data["answered"])
        return client

    def advertise(self) -> Advertise:
        return Advertise(
            self.client,
            agreement_public_bytes(self._cipher_key),
            agreement_public_bytes(self._mask_key),
        )

    def _channel(self, peer: int) -> bytes:
        """The AES-GCM key of the share channel with ``peer``."""
        shared = agree(self._cipher_key, self._peers[peer].cipher_public)
        return hkdf_sha256(shared, b"share-channel|" + self.round_label)

    def share(self, advertised: Sequence[Advertise]) -> EncryptedShares:
        peers = {a.client: a for a in advertised}
        if len(peers) < self.threshold or self.client not in peers:
            raise SecAggError(
                f"only {len(peers)} clients advertised keys; threshold is {self.threshold}"
            )
        self._peers = peers
        holders = sorted(peers)
        b_shares = share_secret(self._self_seed, holders, self.threshold)
        key_shares = share_secret(agreement_private_bytes(self._mask_key), holders, self.threshold)
        out = {}
        for peer in holders:
            plain = b_shares[peer].to_bytes(66, "big") + key_shares[peer].to_bytes(66, "big")
            nonce = os.urandom(12)
            aad = f"{self.client}->{peer}".encode()
            out[peer] = nonce + aead_encrypt(self._channel(peer), nonce, plain, aad)
        return EncryptedShares(self.client, out)

    def mask(self, received: Mapping[int, bytes], values: np.ndarray) -> MaskedInput:
        """Store the shares sent to us; return our masked vector (encoded if float)."""
        if len(received) < self.threshold:
            raise SecAggError(
                f"only {len(received)} clients shared keys; threshold is {self.threshold}"
            )
        for sender, blob in received.items():
            aad = f"{sender}->{self.client}".encode()
            try:
                plain = aead_decrypt(self._channel(sender), blob[:12], blob[12:], aad)
            except Exception as err:  # InvalidTag and malformed input alike
                raise SecAggError(f"share from client {sender} does not decrypt") from err
            self._held[sender] = (
                int.from_bytes(plain[:66], "big"),
                int.from_bytes(plain[66:], "big"),
            )
        self._sharers = sorted(received)
        vector = values.astype(np.uint64) if values.dtype == np.uint64 else encode(values)
        masked = vector + prg(self._self_seed, vector.size, self.round_label)
        for peer in self._sharers:
            if peer == self.client:
                continue
            pair = prg(
                _pair_seed(self._mask_key, self._peers[peer].mask_public),
                vector.size,
                self.round_label,
            )
            masked = masked + pair if self.client < peer else masked - pair
        return MaskedInput(self.client, masked)

    def unmask(self, survivors: Sequence[int]) -> UnmaskShares:
        """Shares of b for survivors, of mask keys for the dropped; once per round."""
        if self._answered:
            raise SecAggError("this client already answered the unmasking request")
        survivors_set = set(survivors)
        if len(survivors_set) < self.threshold:
            raise SecAggError(f"only {len(survivors_set)} survivors; threshold is {self.threshold}")
        if not survivors_set <= set(self._sharers):
            raise SecAggError("survivor list names clients that never shared keys")
        self._answered = True
        dropped = set(self._sharers) - survivors_set
        return UnmaskShares(
            self.client,
            {i: self._held[i][0] for i in survivors_set},
            {i: self._held[i][1] for i in dropped},
        )


# ---------------------------------------------------------------- server


@dataclass
class SecAggServer:
    """The coordinator's side of one round: routes shares, sums masked vectors, unmasks."""

    clients: int
    threshold: int
    round_label: bytes
    advertised: dict[int, Advertise] = field(default_factory=dict)
    sharers: list[int] = field(default_factory=list)
    survivors: list[int] = field(default_factory=list)  # whose masked vector was folded
    _total: np.ndarray | None = None  # their running sum, mod 2^64

    def __post_init__(self) -> None:
        check_setup(self.clients, self.threshold)

    def collect_keys(self, messages: Sequence[Advertise]) -> list[Advertise]:
        self.advertised = {m.client: m for m in messages}
        if len(self.advertised) < self.threshold:
            raise SecAggError(
                f"{len(self.advertised)} clients advertised keys; need {self.threshold}"
            )
        return list(self.advertised.values())

    def route_shares(self, messages: Sequence[EncryptedShares]) -> dict[int, dict[int, bytes]]:
        """Per recipient: the ciphertexts addressed to it (from clients that shared)."""
        self.sharers = sorted(m.sender for m in messages if m.sender in self.advertised)
        if len(self.sharers) < self.threshold:
            raise SecAggError(f"{len(self.sharers)} clients shared keys; need {self.threshold}")
        inbox: dict[int, dict[int, bytes]] = {c: {} for c in self.sharers}
        for message in messages:
            for recipient, blob in message.ciphertexts.items():
                if recipient in inbox:
                    inbox[recipient][message.sender] = blob
        return inbox

    def add_masked(self, message: MaskedInput) -> None:
        """Fold one masked vector into the running sum (mod 2^64) the moment it arrives, so the
        server holds one vector whatever the number of clients; ``SecAggError`` when it cannot
        count (a client that did not share keys, a second vector, another length)."""
        if message.client not in self.sharers:
            raise SecAggError(f"client {message.client} did not share keys this round")
        if message.client in self.survivors:
            raise SecAggError(f"client {message.client} already sent a masked vector")
        if self._total is None:
            self._total = message.vector.astype(np.uint64, copy=True)
        elif message.vector.size != self._total.size:
            raise SecAggError("masked vectors differ in length")
        else:
            self._total += message.vector
        self.survivors.append(message.client)

    def close_masking(self) -> list[int]:
        """The survivors the unmasking request names; aborts below the threshold."""
        if len(self.survivors) < self.threshold:
            raise SecAggError(
                f"{len(self.survivors)} masked vectors arrived; need {self.threshold}: aborting"
            )
        return sorted(self.survivors)

    def collect_masked(self, messages: Sequence[MaskedInput]) -> list[int]:
        """Fold a batch of masked vectors (those of clients that shared keys); the survivors."""
        if len({m.vector.size for m in messages}) > 1:
            raise SecAggError("masked vectors differ in length")
        for message in messages:
            if message.client in self.sharers:
                self.add_masked(message)
        return self.close_masking()

    def unmask(self, messages: Sequence[UnmaskShares]) -> np.ndarray:
        """The exact sum (uint64) of the survivors' vectors, or ``SecAggError``."""
        folded = set(self.survivors)
        answers = [m for m in messages if m.client in folded]
        if self._total is None or len(answers) < self.threshold:
            raise SecAggError(
                f"{len(answers)} clients answered the unmasking; need {self.threshold}: aborting "
                "without a result"
            )
        survivors = sorted(folded)
        dropped = sorted(set(self.sharers) - folded)
        size = self._total.size
        total: np.ndarray = self._total.copy()
        for client in survivors:
            shares = {m.client: m.self_mask[client] for m in answers if client in m.self_mask}
            seed = recover_secret(shares, self.threshold)
            total -= prg(seed, size, self.round_label)
        for client in dropped:
            shares = {m.client: m.mask_key[client] for m in answers if client in m.mask_key}
            key = agreement_key_from_bytes(recover_secret(shares, self.threshold))
            for peer in survivors:
                pair = prg(
                    _pair_seed(key, self.advertised[peer].mask_public), size, self.round_label
                )
                # survivor `peer` added +pair if peer < client, -pair otherwise: undo it
                total = total - pair if peer < client else total + pair
        return total
