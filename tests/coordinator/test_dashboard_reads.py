"""The dashboard's reads and guards without a browser (seconds): a registry and a run folder
written through their owners, the pages served in process by the real app.

The browser test against a live coordinator is ``test_dashboard.py`` (integration).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from coordinator.dashboard import CoordinatorSource, DashboardAuthError, build_app
from coordinator.dashboard.plots import Series, line_plot
from coordinator.dashboard.reads import _state, wilson
from coordinator.dashboard.server import check_binding
from coordinator.service.audit import Audit
from coordinator.state.folder import RunFolder
from coordinator.store import Store, open_store
from coordinator.store.overview import RunRecord

CONFIG = {
    "model": {"name": "tiny"},
    "data": {"name": "news.jsonl"},
    "federation": {"rounds": 2, "aggregation": "fedavg", "round_timeout": 300.0},
    "privacy": {"epsilon": 0.0},
}


def _registry(tmp_path: Path) -> tuple[Store, RunFolder]:
    store = open_store(tmp_path / "state")
    for index, name in enumerate(("site-a", "site-b")):
        store.enroll(store.mint_token(), name, f"{index:064x}", flower_key="")
        store.set_flower_node_id(name, str(1000 + index))
    folder = RunFolder.at(tmp_path / "runs" / "first")
    folder.write_client_reports(
        [
            {"round": 1, "node-id": 1000, "num-examples": 30, "partition-id": 0, "train-loss": 2.5},
            {"round": 1, "node-id": 1001, "num-examples": 20, "partition-id": 1, "train-loss": 3.5},
            {"round": 2, "node-id": 1000, "num-examples": 30, "partition-id": 0, "train-loss": 1.5},
            {"round": 2, "node-id": 1001, "quarantined": "update norm 1e9 is not finite"},
            {"round": 2, "node-id": 1002, "error": "Traceback…\nValueError: bad batch"},
        ]
    )
    folder.write_outcomes([{"round": 1, "outcome": "aggregated 2 updates"}])
    run_id = store.create_run(str(folder.path), CONFIG, "b" * 64, 2)
    store.close_round(store.open_round(run_id, 1), "aggregated 2 updates", "c" * 64)
    store.open_round(run_id, 2)
    return store, folder


def test_a_running_run_shows_rounds_losses_and_every_reply_verdict(tmp_path: Path) -> None:
    store, _ = _registry(tmp_path)
    source = CoordinatorSource(tmp_path / "state", store)
    (run,) = source.runs()
    assert (run.state, run.progress, run.label) == ("running", "1/2", "first")
    assert (run.accepted, run.dropped, run.quarantined) == (3, 1, 1)
    assert run.last_loss == 1.5
    # read through offsite.config: the defaults it leaves out are the config's own
    assert (run.model, run.data, run.aggregation) == (
        "tiny",
        "news.jsonl",
        "fedavg · fedavg · naive",
    )
    detail = source.run(run.key)
    assert detail is not None
    one, two = detail.rounds
    assert (one.accepted, one.mean_loss, one.losses) == (2, 3.0, {"site-a": 2.5, "site-b": 3.5})
    assert two.status == "open" and (two.accepted, two.dropped, two.quarantined) == (1, 1, 1)
    assert "site-b: update norm 1e9 is not finite" in two.reasons
    assert "node 1002: ValueError: bad batch" in two.reasons  # an unknown node, by its id
    assert detail.loss_svg.startswith("<svg") and "site-a" in detail.loss_svg
    nodes = {n.name: n for n in source.nodes().nodes}
    assert nodes["site-a"].examples == (("first", 60),) and nodes["site-b"].examples == (
        ("first", 20),
    )
    assert nodes["site-a"].superlink == "not serving"


def test_run_states_follow_the_report_and_the_registry_activity(tmp_path: Path) -> None:
    folder = RunFolder.at(tmp_path / "run")
    old = datetime.now(timezone.utc) - timedelta(hours=2)
    record = RunRecord(1, "x", "running", 2, "", CONFIG, old, None, 1, 0, 1, old)
    assert _state(record, folder, {}) == "failed"  # stopped, and nothing to resume from
    folder.config_path.write_text("")
    folder.plan_path.write_text("{}")
    assert _state(record, folder, {}) == "resumable"
    assert _state(record, folder, {"scores": {"plug_in": {}}}) == "finished"
    assert _state(record, folder, {"training": {"warning": "no round"}}) == "failed"
    recent = RunRecord(
        1, "x", "running", 2, "", CONFIG, old, None, 1, 0, 1, datetime.now(timezone.utc)
    )
    assert _state(recent, folder, {}) == "running"


def test_mutations_need_the_csrf_token_and_are_audited(tmp_path: Path) -> None:
    store, _ = _registry(tmp_path)
    source = CoordinatorSource(tmp_path / "state", store)
    client = TestClient(build_app(source), base_url="http://127.0.0.1:8480")
    page = client.get("/nodes")
    assert page.status_code == 200 and "site-a" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    csrf = client.cookies["offsite_csrf"]
    found = client.get("/nodes", params={"q": "site-b"}).text
    assert 'data-node="site-b"' in found and 'data-node="site-a"' not in found
    assert "2 enrolled" in found  # the counts cover every node, not the filtered rows
    assert client.post("/nodes/site-a/revoke", data={"confirm": "site-a"}).status_code == 403
    assert (
        client.post(
            "/nodes/site-a/revoke", data={"confirm": "site-a", "csrf": "forged"}
        ).status_code
        == 403
    )
    assert {n.name: n.status for n in store.nodes()}["site-a"] == "active"
    done = client.post(
        "/nodes/site-a/revoke", data={"confirm": "site-a", "csrf": csrf}, follow_redirects=False
    )
    assert done.status_code == 303 and {n.name: n.status for n in store.nodes()}["site-a"] == (
        "revoked"
    )
    minted = client.post("/nodes/token", data={"hours": "2", "csrf": csrf})
    assert minted.status_code == 200 and 'id="minted-token"' in minted.text
    assert client.post("/nodes/token", data={"hours": "nan", "csrf": csrf}).status_code == 400
    big = client.post("/nodes/token", content=b"hours=1&csrf=" + b"x" * 20_000)
    assert big.status_code == 413  # read no further than a form of ours can be
    events = [(e["event"], e.get("node")) for e in Audit(tmp_path / "state").entries()]
    assert ("revoked", "site-a") in events and ("token-minted", None) in events
    # another host name (DNS rebinding) is not answered without a token
    assert TestClient(build_app(source)).get("/runs").status_code == 421


def test_with_an_admin_token_every_page_needs_it(tmp_path: Path) -> None:
    store, _ = _registry(tmp_path)
    token = "t" * 32
    client = TestClient(build_app(CoordinatorSource(tmp_path / "state", store), token))
    assert client.get("/runs").status_code == 401
    assert client.get("/healthz").status_code == 200
    assert client.get("/runs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert client.post("/login", data={"token": token}, follow_redirects=False).status_code == 303
    assert client.get("/artifacts").status_code == 200


def test_binding_beyond_loopback_needs_a_token() -> None:
    assert check_binding("127.0.0.1:0", None) == ("127.0.0.1", 0)
    assert check_binding("[::1]:8480", None) == ("::1", 8480)
    with pytest.raises(DashboardAuthError, match="admin token"):
        check_binding("0.0.0.0:8480", None)
    assert check_binding("0.0.0.0:8480", "x" * 32) == ("0.0.0.0", 8480)
    with pytest.raises(DashboardAuthError, match="in clear"):  # a token over plain HTTP
        check_binding("0.0.0.0:8480", "x" * 32, tls=False)
    assert check_binding("127.0.0.1:8480", None, tls=False) == ("127.0.0.1", 8480)


def test_plots_and_intervals() -> None:
    svg = line_plot([Series("<client>", [(1, 2.0), (2, 1.0)])], "round", "loss", budget=3.0)
    assert svg.startswith("<svg") and "&lt;client&gt;" in svg and "budget 3" in svg
    assert line_plot([Series("a", [])], "round", "loss") == ""
    low, high = wilson(129, 150)  # 86.0 % of 150
    assert round(100 * low, 1) == 79.5 and round(100 * high, 1) == 90.7
    assert json.dumps(low)  # plain floats


def test_loopback_is_decided_in_one_place_for_hosts_and_addresses() -> None:
    from offsite.host.network import is_loopback, is_loopback_host

    for host in ("localhost", "127.0.0.1", "127.8.0.1", "::1", "[::1]"):
        assert is_loopback_host(host), host
    for host in ("0.0.0.0", "10.0.0.5", "::", "example.org", "localhost.example.org"):
        assert not is_loopback_host(host), host
    assert is_loopback("[::1]:8480") and is_loopback("127.0.0.1:9092")
    assert not is_loopback("0.0.0.0:8480") and not is_loopback("[::]:8480")


def test_export_links_are_url_encoded_and_download(tmp_path: Path) -> None:
    store, folder = _registry(tmp_path)
    folder.adapter_path(1).parent.mkdir(parents=True)
    folder.adapter_path(1).write_bytes(b"adapter")
    folder.export_dir(1).mkdir(parents=True)
    (folder.export_dir(1) / "notes #1.txt").write_text("kept")
    client = TestClient(
        build_app(CoordinatorSource(tmp_path / "state", store)), base_url="http://127.0.0.1:8480"
    )
    (run,) = CoordinatorSource(tmp_path / "state", store).runs()
    page = client.get(f"/runs/{run.key}").text
    href = "/files/export/round-1/notes%20%231.txt"
    assert href in page, page
    assert client.get(f"/runs/{run.key}{href}").text == "kept"
