"""The registry leads a real Flower SuperLink (loopback, TLS, node authentication).

``reconcile`` registers enrolled nodes' keys, unregisters revoked ones, removes registrations
the registry does not know, notes a node unregistered behind its back (Flower never re-admits
that key) and registers the fresh key the node then sends; a coordinator started later repairs
what changed while it was down. Every change is in the audit log.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.service.app_registry import AppRegistry
from coordinator.service.audit import Audit
from coordinator.service.flower_link import FlowerLink
from coordinator.service.pki import Pki, init_pki
from coordinator.store import Store, open_store
from offsite.host.processes import stop_tree

pytestmark = pytest.mark.integration


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _key() -> str:
    public = ec.generate_private_key(ec.SECP384R1()).public_key()
    return public.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


@pytest.fixture(scope="module")
def link(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerLink]:
    state = tmp_path_factory.mktemp("coordinator")
    pki = init_pki(state / "pki", ["127.0.0.1"])
    found = FlowerLink.of_state(state, f"127.0.0.1:{_port()}", f"127.0.0.1:{_port()}")
    registry = AppRegistry(state).start()
    process = found.start(pki, registry.url)
    try:
        yield found
    finally:
        stop_tree(process)
        registry.stop()


def _live(link: FlowerLink) -> dict[str, str]:
    return {n.node_id: n.name for n in link.nodes() if n.status != "unregistered"}


def _keys(store: Store) -> dict[str, object]:
    return {k.name: k for k in store.flower_keys()}


def test_reconcile_makes_the_superlink_admit_exactly_the_enrolled_nodes(link: FlowerLink) -> None:
    state = link.home.parent
    store, audit = open_store(state), Audit(state)
    for index, name in enumerate(("site-a", "site-b")):
        store.enroll(store.mint_token(), name, f"{index:064x}", _key())
    assert link.reconcile(store, audit) == 2
    ids = {name: key.flower_node_id for name, key in _keys(store).items()}
    assert set(_live(link)) == set(ids.values()) and None not in ids.values()
    assert link.reconcile(store, audit) == 0  # in sync: nothing to do

    rogue = link.register(_key(), "rogue")  # behind the registry's back
    assert rogue in _live(link)
    assert link.reconcile(store, audit) == 1
    assert rogue not in _live(link) and set(_live(link)) == set(ids.values())

    link.unregister(str(ids["site-b"]))  # an enrolled node dropped behind the registry's back
    link.reconcile(store, audit)
    lost = _keys(store)["site-b"]
    assert lost.public_key == "" and lost.flower_node_id is None
    store.set_flower_key("site-b", _key())  # what the node's renewal delivers
    link.reconcile(store, audit)
    back = _keys(store)["site-b"].flower_node_id
    assert back not in (None, ids["site-b"]) and back in _live(link)

    store.revoke("site-a")
    link.reconcile(store, audit)
    assert ids["site-a"] not in _live(link) and _keys(store)["site-a"].flower_node_id is None
    assert set(_live(link)) == {back}

    events = [e["event"] for e in audit.entries()]
    assert events.count("superlink-node-registered") == 3
    for event in ("superlink-node-removed", "superlink-node-lost", "superlink-node-unregistered"):
        assert event in events


def test_a_restarted_coordinator_repairs_what_changed_while_it_was_down(
    link: FlowerLink,
) -> None:
    state = link.home.parent
    rogue = link.register(_key(), "while-down")
    # a new process: fresh registry connection and link object, as `coordinator serve` starts
    restarted = FlowerLink.of_state(state, link.address, link.control)
    assert restarted.reconcile(open_store(state), Audit(state)) >= 1
    assert rogue not in _live(link)
    assert Pki(state / "pki").exists()
