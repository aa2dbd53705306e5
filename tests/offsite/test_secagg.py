"""Secure aggregation: exact sums, dropouts below and above the threshold, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from offsite.federation.secagg import (
    FRACTION_BITS,
    SecAggClient,
    SecAggError,
    SecAggServer,
    check_setup,
    decode,
    encode,
    prg,
    recover_secret,
    share_secret,
)


def _run(
    inputs: dict[int, np.ndarray],
    threshold: int,
    drop_before_mask: set[int] = frozenset(),
    drop_before_unmask: set[int] = frozenset(),
) -> np.ndarray:
    label = b"round-1"
    clients = {i: SecAggClient(i, threshold, label) for i in inputs}
    server = SecAggServer(len(inputs), threshold, label)
    advertised = server.collect_keys([c.advertise() for c in clients.values()])
    inbox = server.route_shares([c.share(advertised) for c in clients.values()])
    masked = [clients[i].mask(inbox[i], inputs[i]) for i in clients if i not in drop_before_mask]
    survivors = server.collect_masked(masked)
    answers = [clients[i].unmask(survivors) for i in survivors if i not in drop_before_unmask]
    return server.unmask(answers)


def _float_inputs(n: int, size: int = 1000) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)  # test data only; masks never come from numpy
    return {i: rng.normal(0, 0.05, size) for i in range(1, n + 1)}


def test_integer_sum_is_exact() -> None:
    rng = np.random.default_rng(1)
    inputs = {i: rng.integers(0, 2**40, 64).astype(np.uint64) for i in range(1, 6)}
    total = _run(inputs, threshold=3)
    assert np.array_equal(total, sum(inputs.values()))


def test_float_sum_is_within_the_quantisation_bound() -> None:
    inputs = _float_inputs(5)
    total = decode(_run(inputs, threshold=3))
    bound = len(inputs) * 2.0 ** -(FRACTION_BITS + 1)
    assert np.abs(total - sum(inputs.values())).max() <= bound


@pytest.mark.parametrize("dropped", [{2}, {1, 5}])
def test_dropouts_below_the_threshold_still_give_the_survivors_sum(dropped: set[int]) -> None:
    inputs = _float_inputs(6)
    total = decode(_run(inputs, threshold=4, drop_before_mask=dropped))
    expected = sum(v for i, v in inputs.items() if i not in dropped)
    assert np.abs(total - expected).max() <= 6 * 2.0 ** -(FRACTION_BITS + 1)


def test_dropout_during_unmasking_is_tolerated_above_threshold() -> None:
    inputs = _float_inputs(5)
    total = decode(_run(inputs, threshold=3, drop_before_mask={4}, drop_before_unmask={1}))
    expected = sum(v for i, v in inputs.items() if i != 4)
    assert np.abs(total - expected).max() <= 5 * 2.0 ** -(FRACTION_BITS + 1)


def test_too_many_dropouts_abort_without_a_result() -> None:
    inputs = _float_inputs(5)
    with pytest.raises(SecAggError, match="aborting"):
        _run(inputs, threshold=3, drop_before_mask={1, 2, 3})
    with pytest.raises(SecAggError, match="aborting"):
        _run(inputs, threshold=4, drop_before_unmask={1, 2})


def test_a_masked_vector_reveals_nothing_obvious() -> None:
    inputs = _float_inputs(4)
    label = b"r"
    clients = {i: SecAggClient(i, 3, label) for i in inputs}
    server = SecAggServer(4, 3, label)
    advertised = server.collect_keys([c.advertise() for c in clients.values()])
    inbox = server.route_shares([c.share(advertised) for c in clients.values()])
    masked = clients[1].mask(inbox[1], inputs[1]).vector
    plain = encode(inputs[1])
    assert np.count_nonzero(masked == plain) == 0
    # high bits of a masked small value are uniform, unlike the encoding's sign extension
    high = (masked >> np.uint64(63)).mean()
    assert 0.4 < high < 0.6


def test_a_client_never_reveals_both_shares_and_answers_once() -> None:
    inputs = _float_inputs(4)
    label = b"r"
    clients = {i: SecAggClient(i, 3, label) for i in inputs}
    server = SecAggServer(4, 3, label)
    advertised = server.collect_keys([c.advertise() for c in clients.values()])
    inbox = server.route_shares([c.share(advertised) for c in clients.values()])
    for i in clients:
        clients[i].mask(inbox[i], inputs[i])
    answer = clients[1].unmask([1, 2, 3])
    assert set(answer.self_mask) == {1, 2, 3} and set(answer.mask_key) == {4}
    with pytest.raises(SecAggError, match="already answered"):
        clients[1].unmask([1, 2, 3, 4])  # a second request could reveal client 4's b too
    with pytest.raises(SecAggError, match="never shared"):
        clients[2].unmask([1, 2, 9])


def test_tampered_share_is_rejected() -> None:
    inputs = _float_inputs(3)
    label = b"r"
    clients = {i: SecAggClient(i, 2, label) for i in inputs}
    server = SecAggServer(3, 2, label)
    advertised = server.collect_keys([c.advertise() for c in clients.values()])
    inbox = server.route_shares([c.share(advertised) for c in clients.values()])
    blob = bytearray(inbox[1][2])
    blob[20] ^= 1
    inbox[1][2] = bytes(blob)
    with pytest.raises(SecAggError, match="does not decrypt"):
        clients[1].mask(inbox[1], inputs[1])


def test_unsafe_setups_are_refused() -> None:
    with pytest.raises(SecAggError, match="at least 3"):
        check_setup(2, 2)
    with pytest.raises(SecAggError, match="half"):
        check_setup(10, 5)
    with pytest.raises(SecAggError, match="exceeds"):
        check_setup(4, 5)
    check_setup(10, 6)


def test_shamir_and_prg_building_blocks() -> None:
    secret = bytes(range(32))
    shares = share_secret(secret, [1, 2, 3, 4, 5], threshold=3)
    assert recover_secret({k: shares[k] for k in (2, 4, 5)}, 3) == secret
    assert recover_secret({k: shares[k] for k in (1, 2)} | {3: shares[3]}, 3) == secret
    with pytest.raises(SecAggError):
        recover_secret({1: shares[1], 2: shares[2]}, 3)
    a, b = prg(b"k" * 32, 1000, b"x"), prg(b"k" * 32, 1000, b"y")
    assert np.array_equal(a, prg(b"k" * 32, 1000, b"x")) and not np.array_equal(a, b)


def test_prg_avalanche_and_no_weak_randomness_in_crypto_code() -> None:
    import ast
    from pathlib import Path

    seed = bytes(range(32))
    flipped = bytes([seed[0] ^ 1]) + seed[1:]
    a, b = prg(seed, 1 << 14, b"r"), prg(flipped, 1 << 14, b"r")  # 2^20 bits
    differing = np.unpackbits((a ^ b).view(np.uint8)).mean()
    assert 0.49 < differing < 0.51
    root = Path(__file__).resolve().parents[2]
    for module in (
        "offsite/federation/secagg.py",
        "offsite/federation/dp/mechanism.py",
        "client/secure_stage.py",
    ):
        tree = ast.parse((root / module).read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "random" not in names and "numpy.random" not in names, module
        assert "np.random" not in (root / module).read_text(), module


def test_every_single_bit_flip_of_a_share_ciphertext_is_caught() -> None:
    inputs = _float_inputs(3, size=4)
    clients = {i: SecAggClient(i, 2, b"r") for i in inputs}
    server = SecAggServer(3, 2, b"r")
    advertised = server.collect_keys([c.advertise() for c in clients.values()])
    inbox = server.route_shares([c.share(advertised) for c in clients.values()])
    blob = inbox[1][2]
    for bit in range(0, 8 * len(blob), max(1, 8 * len(blob) // 1000)):
        tampered = bytearray(blob)
        tampered[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(SecAggError, match="does not decrypt"):
            SecAggClient.restore(clients[1].export()).mask(
                {**inbox[1], 2: bytes(tampered)}, inputs[1]
            )
    # a share addressed to someone else (wrong associated data) is refused too
    with pytest.raises(SecAggError, match="does not decrypt"):
        SecAggClient.restore(clients[1].export()).mask({**inbox[1], 2: inbox[3][2]}, inputs[1])


def test_one_hundred_clients_with_dropouts_at_the_default_threshold() -> None:
    """Population scale, protocol only: 100 clients, threshold 67 (max(majority, 2/3), the
    coordinator's default), 10 drop before masking and 5 more before unmasking. The server folds
    each masked vector as it arrives and holds one running sum."""
    inputs = _float_inputs(100, size=32)
    dropped, silent = set(range(1, 101, 10)), {2, 13, 24, 35, 46}
    total = decode(_run(inputs, threshold=67, drop_before_mask=dropped, drop_before_unmask=silent))
    expected = sum(v for i, v in inputs.items() if i not in dropped)
    assert np.abs(total - expected).max() <= 100 * 2.0 ** -(FRACTION_BITS + 1)


def test_the_server_folds_masked_vectors_and_refuses_a_second_one() -> None:
    inputs = _float_inputs(4, size=8)
    label = b"round-1"
    clients = {i: SecAggClient(i, 3, label) for i in inputs}
    server = SecAggServer(4, 3, label)
    advertised = server.collect_keys([c.advertise() for c in clients.values()])
    inbox = server.route_shares([c.share(advertised) for c in clients.values()])
    first = clients[1].mask(inbox[1], inputs[1])
    server.add_masked(first)
    with pytest.raises(SecAggError, match="already sent"):
        server.add_masked(first)
    with pytest.raises(SecAggError, match="differ in length"):
        server.add_masked(clients[2].mask(inbox[2], inputs[2][:4]))
    with pytest.raises(SecAggError, match="aborting"):
        server.close_masking()  # one of three needed
