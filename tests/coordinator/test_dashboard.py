"""The operator dashboard in a real headless Chromium, against a live coordinator.

The coordinator runs as in ``test_deployment`` (SuperLink behind nginx, two enrolled SuperNodes
on their own data) with ``--dashboard`` on loopback, and one finished deployed run of a tiny
model (one round). Chromium (Debian's, driven by Debian's chromedriver: nothing is downloaded)
loads every page and reads the browser's console: no errors, and the pages show the nodes
online with the examples they reported, the run's round and the five-way numbers of its
``metrics.json``. A revoke from the page (confirmation, CSRF token) takes effect on the
SuperLink; a POST without the CSRF token is refused. Beyond loopback a dashboard without an
admin token refuses to start (exit 14); with one, the coordinator serves it over TLS and
unauthenticated requests get 401 (`offsite dashboard` over a runs folder likewise).

Screenshots of each page go to ``docs/images/dashboard/`` when ``OFFSITE_DASHBOARD_SHOTS=1``.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from offsite.errors import ExitCode
from offsite.host.processes import wait_for_port
from tests.conftest import LAYER_DROP_OVERRIDES
from tests.coordinator.test_deployment import Deployment, _free_port, running_deployment

pytestmark = pytest.mark.integration
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "images" / "dashboard"


@dataclass
class Board:
    deployment: Deployment
    url: str
    run: Path
    run_key: str


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Iterator[Board]:
    """A serving coordinator with its dashboard on loopback, two online nodes, one finished
    one-round run."""
    from coordinator.store import open_store

    port = _free_port()
    root = tmp_path_factory.mktemp("dashboard")
    with running_deployment(root, tokenizer, ("--dashboard", f"127.0.0.1:{port}")) as found:
        wait_for_port(f"127.0.0.1:{port}", 60.0, found.server)
        run = found.root / "runs" / "first"
        # a plain layer drop: the emulator's cost is not what this test is about
        found.processes.offsite(*found.run_args(1, run), *LAYER_DROP_OVERRIDES, timeout=600)
        run_id = open_store(found.state).run_id(str(run.resolve()))
        assert run_id is not None
        yield Board(found, f"http://127.0.0.1:{port}", run, str(run_id))


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("chromium and chromium-driver are missing: run `make system-packages`")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager never downloads a driver or browser
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # the tests may run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1360,900",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _open(driver, url: str, shot: str | None = None) -> None:
    """Load ``url``; the page must leave no error in the browser's console."""
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(url)
    assert driver.execute_script("return document.readyState") == "complete"
    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, f"{url}: {errors}"
    if shot and os.environ.get("OFFSITE_DASHBOARD_SHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1360, min(max(int(height) + 40, 500), 2400))
        driver.save_screenshot(str(SHOTS / f"{shot}.png"))
        driver.set_window_size(1360, 900)


def _after_click(driver, element_id: str):
    """The element ``element_id`` of the page a click navigates to. A click on a submit button
    or a link returns before the next page has loaded; one full run looked too early."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, 30).until(
        expected_conditions.presence_of_element_located((By.ID, element_id))
    )


def _rows(driver, table: str) -> list[list[str]]:
    from selenium.webdriver.common.by import By

    return [
        [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
        for row in driver.find_elements(By.CSS_SELECTOR, f"table#{table} tbody tr")
    ]


def _expected_examples(board: Board) -> dict[str, int]:
    """Examples each node reported in the run's rounds log, by node name (the registry maps
    the SuperLink's node ids to names)."""
    from coordinator.store import open_store

    names = {k.flower_node_id: k.name for k in open_store(board.deployment.state).flower_keys()}
    found: dict[str, int] = {}
    for reply in json.loads((board.run / "rounds.json").read_text()):
        name = names[str(reply["node-id"])]
        found[name] = found.get(name, 0) + int(reply["num-examples"])
    return found


def test_every_page_loads_clean_and_shows_nodes_rounds_and_the_five_way_table(
    board: Board, browser
) -> None:
    from coordinator.evaluation.five_way import SETTINGS
    from coordinator.evaluation.report import format_score

    driver = browser
    expected = _expected_examples(board)
    assert set(expected) == {"site-a", "site-b"}
    deadline = time.monotonic() + 60
    while True:  # the SuperNodes come back online after the run's ClientApps exit
        _open(driver, f"{board.url}/nodes")
        nodes = {row[0]: row for row in _rows(driver, "nodes")}
        if all(nodes.get(n, ["", "", ""])[2] == "online" for n in expected):
            break
        assert time.monotonic() < deadline, nodes
        time.sleep(2)
    _open(driver, f"{board.url}/nodes", shot="nodes")
    nodes = {row[0]: row for row in _rows(driver, "nodes")}
    assert set(nodes) == {"site-a", "site-b"}
    for name, count in expected.items():
        assert nodes[name][1] == "active" and nodes[name][2] == "online"
        assert nodes[name][5].startswith("fpk_")  # the app-signing key the node pinned
        assert nodes[name][6] == f"first: {count}", nodes[name]

    _open(driver, f"{board.url}/runs", shot="runs")
    (run,) = _rows(driver, "runs")
    assert run[0] == "first" and run[1] == "finished" and run[2].endswith("1/1")
    assert run[6] == "2 / 0 / 0"  # both nodes' replies accepted

    _open(driver, f"{board.url}/runs/{board.run_key}", shot="run")
    metrics = json.loads((board.run / "metrics.json").read_text())
    shown = {row[0]: row[1] for row in _rows(driver, "five-way")}
    scores = metrics["scores"]
    assert shown == {
        title: format_score(scores[key]["metric"], scores[key]["value"])
        for key, title in SETTINGS
        if key in scores
    }
    assert len(shown) >= 4
    (first,) = _rows(driver, "rounds")
    assert first[0] == "1" and first[1] == "closed" and first[4:7] == ["2", "0", "0"]
    page = driver.page_source
    assert metrics["run"]["bundle_digest"] in page
    signature = driver.find_element("id", "signature").text
    assert signature.startswith("valid"), signature
    assert "middle tensors shipped verbatim" in driver.find_element("id", "privacy").text

    _open(driver, f"{board.url}/artifacts", shot="artifacts")
    artifacts = _rows(driver, "artifacts")
    kinds = [row[0] for row in artifacts]
    assert "bundle" in kinds and "adapter" in kinds
    bundle = next(row for row in artifacts if row[0] == "bundle")
    assert bundle[3].startswith("SHA256:") and "first" in bundle[4]


def test_a_revoke_from_the_page_takes_effect_on_the_superlink(board: Board, browser) -> None:
    from selenium.webdriver.common.by import By

    from coordinator.service.audit import Audit
    from coordinator.store import open_store
    from tests.coordinator.test_deployment import _online

    driver = browser
    state = board.deployment.state
    _open(driver, f"{board.url}/nodes")
    driver.find_element(By.ID, "mint-token").click()
    token = _after_click(driver, "minted-token").text.strip()
    assert len(token) >= 32
    # a forged POST (no CSRF token, foreign origin) is refused and changes nothing
    forged = httpx.post(
        f"{board.url}/nodes/site-a/revoke",
        data={"confirm": "site-a"},
        headers={"Origin": "http://evil.example"},
    )
    assert forged.status_code == 403
    assert {n.name: n.status for n in open_store(state).nodes()}["site-a"] == "active"

    _open(driver, f"{board.url}/nodes")
    row = driver.find_element(By.CSS_SELECTOR, 'tr[data-node="site-b"]')
    row.find_element(By.LINK_TEXT, "revoke").click()
    _after_click(driver, "confirm-revoke").click()  # the confirmation page
    assert "site-b" in _after_click(driver, "revoked-notice").text
    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors

    deadline = time.monotonic() + 60
    keys = {k.name: k for k in open_store(state).flower_keys()}
    while keys["site-b"].flower_node_id is not None and time.monotonic() < deadline:
        time.sleep(1.0)
        keys = {k.name: k for k in open_store(state).flower_keys()}
    assert keys["site-b"].flower_node_id is None  # unregistered from the SuperLink
    assert not keys["site-b"].active and keys["site-a"].active
    online = _online(board.deployment)
    assert list(online.values()).count("online") == 1, online
    events = [(e["event"], e.get("node"), e.get("by")) for e in Audit(state).entries()]
    assert ("revoked", "site-b", "dashboard") in events
    assert ("token-minted", None, "dashboard") in events
    assert any(e == "superlink-node-unregistered" and n == "site-b" for e, n, _ in events)
    _open(driver, f"{board.url}/nodes")
    nodes = {row[0]: row for row in _rows(driver, "nodes")}
    assert nodes["site-b"][1] == "revoked" and nodes["site-a"][2] == "online"


def _reachable_address() -> str:
    """This host's address on a non-loopback interface (127.0.0.1 when it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent; picks the outgoing interface
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def test_offsite_dashboard_shows_a_runs_folder_and_needs_a_token_beyond_loopback(
    board: Board,
) -> None:
    env = {
        k: v for k, v in board.deployment.processes.env.items() if k != "OFFSITE_DASHBOARD_TOKEN"
    }
    command = [sys.executable, "-m", "offsite.cli.main", "dashboard", str(board.run.parent)]
    port = _free_port()
    refused = subprocess.run(
        [*command, "--bind", f"0.0.0.0:{port}"], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert refused.returncode == ExitCode.DASHBOARD_AUTH, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "admin token" in lines[0], refused.stderr

    token = "a-long-enough-admin-token-for-tests"
    env["OFFSITE_DASHBOARD_TOKEN"] = token
    in_clear = subprocess.run(
        [*command, "--bind", f"0.0.0.0:{port}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip  (a token alone would cross the network in clear over plain HTTP)
    assert in_clear.returncode == ExitCode.DASHBOARD_AUTH, in_clear.stderr
    lines = in_clear.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tls-cert" in lines[0], in_clear.stderr

    address = _reachable_address()
    ca_pem, cert, key = _server_certificate(board.run.parent.parent / "tls", address)
    server = subprocess.Popen(
        [*command, "--bind", f"0.0.0.0:{port}", "--tls-cert", str(cert), "--tls-key", str(key)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_port(f"127.0.0.1:{port}", 60.0, server)
        ca = ssl.create_default_context(cafile=str(ca_pem))
        url = f"https://{address}:{port}"
        assert httpx.get(f"{url}/runs", verify=ca).status_code == 401
        wrong = httpx.get(f"{url}/runs", verify=ca, headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401
        allowed = httpx.get(f"{url}/runs", verify=ca, headers={"Authorization": f"Bearer {token}"})
        assert allowed.status_code == 200 and 'data-run="first"' in allowed.text
        assert "finished" in allowed.text  # read from the run folder alone (its report)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _server_certificate(folder: Path, address: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for ``address`` (ca.pem, cert.pem, key.pem)."""
    from offsite.crypto.certificates import issue_server_certificate, self_signed_ca
    from offsite.crypto.keys import generate_ec_key, private_key_pem

    folder.mkdir(parents=True, exist_ok=True)
    ca_key, server_key = generate_ec_key(), generate_ec_key()
    ca = self_signed_ca(ca_key, "dashboard test CA", days=1)
    cert = issue_server_certificate(
        ca_key, ca, server_key, "dashboard", [address, "127.0.0.1"], days=1
    )
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    for path, pem in zip(paths, (ca, cert, private_key_pem(server_key)), strict=True):
        path.write_bytes(pem)
    return paths


def test_the_coordinator_serves_its_dashboard_beyond_loopback_over_tls_with_a_token(
    tmp_path: Path,
) -> None:
    """No SuperLink (`--flower off`): the dashboard's TLS and token checks on their own."""
    address = _reachable_address()
    env = dict(os.environ, OFFSITE_HOME=str(tmp_path / "home"), PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "offsite.cli.main", "coordinator"]
    state = tmp_path / "coordinator"
    subprocess.run(
        [*command, "init", "--state", str(state), "--host", address, "--host", "127.0.0.1"],
        env=env, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    port = _free_port()
    refused = subprocess.run(
        [*command, "serve", "--state", str(state), "--dashboard", f"0.0.0.0:{port}"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == ExitCode.DASHBOARD_AUTH, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "beyond loopback" in lines[0], refused.stderr
    token = tmp_path / "dashboard.token"
    token.write_text("another-long-admin-token-for-tests\n")
    server = subprocess.Popen(
        [*command, "serve", "--state", str(state), "--flower", "off",
         "--enroll", f"127.0.0.1:{_free_port()}", "--artifacts", f"127.0.0.1:{_free_port()}",
         "--dashboard", f"0.0.0.0:{port}", "--dashboard-token-file", str(token)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_port(f"127.0.0.1:{port}", 90.0, server)
        ca = ssl.create_default_context(cafile=str(state / "pki" / "ca.pem"))
        url = f"https://{address}:{port}"
        assert httpx.get(f"{url}/nodes", verify=ca).status_code == 401
        with pytest.raises(httpx.HTTPError):  # no plaintext beside TLS
            httpx.get(f"http://{address}:{port}/nodes")
        secret = token.read_text().strip()
        page = httpx.get(f"{url}/nodes", verify=ca, headers={"Authorization": f"Bearer {secret}"})
        assert page.status_code == 200 and "No node has enrolled yet" in page.text
        with httpx.Client(verify=ca) as browser_like:  # the login form's session cookie
            assert browser_like.post(f"{url}/login", data={"token": "wrong"}).status_code == 401
            signed_in = browser_like.post(f"{url}/login", data={"token": secret})
            assert signed_in.status_code == 303
            assert "secure" in signed_in.headers["set-cookie"].lower()  # HTTPS only
            assert browser_like.get(f"{url}/artifacts").status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)
