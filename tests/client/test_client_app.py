"""The data owner's ClientApp: what it derives from its node (fast, no Flower run)."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import Context, RecordDict

from client.flower_app import _partition


def _context(node_id: int, node_config: dict) -> Context:
    return Context(
        run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={}
    )


def _identity(folder: Path, name: str) -> Path:
    folder.mkdir()
    (folder / "node.json").write_text(json.dumps({"name": name}))
    return folder


def test_a_deployed_node_keeps_its_seed_partition_when_flower_renumbers_it(tmp_path: Path) -> None:
    site_a = str(_identity(tmp_path / "a", "site-a"))
    site_b = str(_identity(tmp_path / "b", "site-b"))
    before = _partition(_context(4_141_592, {"identity-dir": site_a}))
    after = _partition(_context(2_718_281, {"identity-dir": site_a}))  # a renewed key
    assert before == after
    assert _partition(_context(4_141_592, {"identity-dir": site_b})) != before


def test_a_simulated_client_uses_its_partition_id() -> None:
    assert _partition(_context(99, {"partition-id": 3})) == 3
