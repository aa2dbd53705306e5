"""The generated wire code is exactly what the .proto sources produce (no drift)."""

from __future__ import annotations

from pathlib import Path

from offsite.wire.generate import TARGET, generate


def test_generated_code_matches_the_proto_sources(tmp_path: Path) -> None:
    fresh = {p.name: p.read_text() for p in generate(tmp_path / "v1")}
    committed = {p.name: p.read_text() for p in TARGET.iterdir() if p.suffix in {".py", ".pyi"}}
    committed.pop("__init__.py", None)
    assert fresh.keys() == committed.keys(), "run `python -m offsite.wire.generate`"
    for name, text in fresh.items():
        assert committed[name] == text, f"{name} drifted; run `python -m offsite.wire.generate`"
    assert {"artifacts_pb2.pyi", "enrollment_pb2.pyi"} <= fresh.keys()  # typed stubs
