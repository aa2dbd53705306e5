"""Folding masked vectors as they arrive: a vector of the wrong length is refused on its own,
whatever order the replies come in."""

from __future__ import annotations

import numpy as np

from coordinator.federation.secure_rounds import SecureRound, fold_masked
from offsite.federation.secagg import SecAggClient, SecAggServer, decode
from tests.coordinator.test_server_strategies import _Nodes

SIZE = 8  # adapter values; the masked vector adds the weight


def test_a_faulty_first_vector_does_not_block_the_honest_ones() -> None:
    label = b"round-1"
    clients = {i: SecAggClient(i, 2, label) for i in (1, 2, 3)}
    server = SecAggServer(3, 2, label)
    advertised = server.collect_keys([c.advertise() for c in clients.values()])
    inbox = server.route_shares([c.share(advertised) for c in clients.values()])
    secure = SecureRound(server, {10 + i: i for i in clients}, {}, _Nodes([]), None)
    values = {i: np.full(SIZE + 1, float(i)) for i in clients}
    short = clients[1].mask(inbox[1], values[1][:4]).vector  # a faulty node, first
    assert "expected 9" in (fold_masked(secure, 11, short, SIZE) or "")
    for i in (2, 3):
        vector = clients[i].mask(inbox[i], values[i]).vector
        assert fold_masked(secure, 10 + i, vector, SIZE) is None
    assert server.close_masking() == [2, 3]
    answers = [clients[i].unmask([2, 3]) for i in (2, 3)]
    np.testing.assert_allclose(decode(server.unmask(answers)), values[2] + values[3])
