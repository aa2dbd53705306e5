"""Onboarding end to end with the real commands, coordinator and node as separate processes."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emulator.adapter import AdapterSpec
from emulator.arch import arch_spec
from emulator.bundle import write_bundle
from emulator.layers import plan_layers
from offsite.errors import ExitCode
from tests.conftest import tiny_model

pytestmark = pytest.mark.integration


def _offsite(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "offsite.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(port: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {port}")


def test_init_token_join_publish_fetch_revoke(tmp_path: Path, tokenizer) -> None:
    env = {**os.environ, "OFFSITE_HOME": str(tmp_path / "home")}
    coordinator, node = tmp_path / "coordinator", tmp_path / "node"
    init = _offsite("coordinator", "init", "--state", str(coordinator), env=env)
    assert init.returncode == 0, init.stderr
    fingerprint = re.search(r"CA fingerprint: ([0-9a-f]{64})", init.stdout).group(1)
    full = tiny_model("llama")
    plan = plan_layers(6, 1, 1, 2)
    spec = AdapterSpec.for_plan("lora", plan, arch_spec(full.config), 4, 8)
    write_bundle(full, tokenizer, plan, spec, tmp_path / "bundle", source="tiny")
    published = _offsite(
        "coordinator", "publish", str(tmp_path / "bundle"), "--state", str(coordinator), env=env
    )
    assert published.returncode == 0, published.stderr
    artifact, bundle = re.search(r"artifact (\w+)\s+bundle (\w+)", published.stdout).groups()

    enroll_port, artifact_port = _free_port(), _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "offsite.cli.main",
            "coordinator",
            "serve",
            "--state",
            str(coordinator),
            "--enroll",
            f"127.0.0.1:{enroll_port}",
            "--artifacts",
            f"127.0.0.1:{artifact_port}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(enroll_port)
        token = _offsite(
            "coordinator", "token", "--state", str(coordinator), env=env
        ).stdout.strip()
        joined = _offsite(
            "client",
            "join",
            "--coordinator",
            f"127.0.0.1:{enroll_port}",
            "--token",
            token,
            "--ca-fingerprint",
            fingerprint,
            "--name",
            "clinic-a",
            "--state",
            str(node),
            env=env,
        )
        assert joined.returncode == 0, joined.stderr
        again = _offsite(
            "client",
            "join",
            "--coordinator",
            f"127.0.0.1:{enroll_port}",
            "--token",
            token,
            "--ca-fingerprint",
            fingerprint,
            "--name",
            "clinic-b",
            "--state",
            str(tmp_path / "b"),
            env=env,
        )
        assert again.returncode == ExitCode.ENROLLMENT and "already used" in again.stderr
        fetched = _offsite("client", "fetch", artifact, bundle, "--state", str(node), env=env)
        assert fetched.returncode == 0, fetched.stderr
        assert (node / "cache" / "bundles" / bundle / "manifest.sig").is_file()
        nodes = _offsite("coordinator", "nodes", "--state", str(coordinator), env=env).stdout
        assert "clinic-a" in nodes and "active" in nodes
        revoked = _offsite(
            "coordinator", "revoke", "clinic-a", "--state", str(coordinator), env=env
        )
        assert revoked.returncode == 0, revoked.stderr
        shutil.rmtree(node / "cache")  # force a new download
        refused = _offsite("client", "fetch", artifact, bundle, "--state", str(node), env=env)
        assert refused.returncode == ExitCode.TRANSFER and "PERMISSION_DENIED" in refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)
