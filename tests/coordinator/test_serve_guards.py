"""`offsite serve` under bad input and hostile callers, on 127.0.0.1 with a free port.

A failed adapter load changes nothing (base model and every adapter keep their exact logits);
bodies and prompts are capped before tokenizing, which runs off the event loop; adapter routes
need the admin token, model routes the API key when set; every error is OpenAI-shaped; the CLI
refuses to bind beyond loopback without an admin token and prints the port it really bound.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.coordinator.test_serve import _peft_adapter, serving

ADMIN, KEY = "admin-token-0123456789abcdef", "api-key-0123456789abcdef"


@pytest.fixture()
def engine(tiny_llama_dir: Path) -> Any:
    from coordinator.serve import Engine

    return Engine(tiny_llama_dir, "tiny", max_prompt_tokens=64)


@pytest.fixture()
def guarded(engine: Any) -> Iterator[tuple[str, Any]]:
    for url in serving(engine, admin_token=ADMIN, api_key=KEY, max_body_bytes=4096):
        yield url, engine


def _logits(engine: Any, name: str) -> torch.Tensor:
    """The engine's next-token logits for a fixed prompt under model ``name``."""
    ids = torch.tensor([engine.encode_prompt("shares market team")])
    with engine.lock, torch.no_grad():
        if name == engine.served_name:
            if engine.model is engine.base:
                return engine.model(input_ids=ids).logits.clone()
            with engine.model.disable_adapter():
                return engine.model(input_ids=ids).logits.clone()
        engine.model.set_adapter(engine.adapters[name]["internal"])
        return engine.model(input_ids=ids).logits.clone()


def _broken_adapter(good: Path, out: Path) -> Path:
    """A PEFT folder whose config (rank 8) disagrees with its weights (rank 4): PEFT injects the
    LoRA layers, then fails loading the weights — the worst moment to fail."""
    import shutil

    shutil.copytree(good, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["r"] = 8
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def _structure(engine: Any) -> list[tuple[str, str]]:
    return [(n, type(m).__name__) for n, m in engine.base.named_modules()]


def test_a_failed_first_load_leaves_the_base_model_exactly_as_it_was(
    engine: Any, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from coordinator.serve.engine import EngineError

    before, shape = _logits(engine, "tiny"), _structure(engine)
    broken = _broken_adapter(_peft_adapter(tiny_llama_dir, tmp_path / "good", 1), tmp_path / "b")
    with pytest.raises(EngineError, match="cannot load adapter"):
        engine.load_adapter("bad", str(broken))
    assert engine.model is engine.base and engine.model_names() == ["tiny"]
    assert _structure(engine) == shape
    assert torch.equal(_logits(engine, "tiny"), before)
    engine.load_adapter("good", str(tmp_path / "good"))  # and the engine still loads adapters
    assert engine.model_names() == ["tiny", "good"]


def test_a_failed_load_or_inplace_replace_keeps_every_loaded_adapter(
    engine: Any, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from coordinator.serve.engine import EngineError

    one = _peft_adapter(tiny_llama_dir, tmp_path / "one", 1)
    two = _peft_adapter(tiny_llama_dir, tmp_path / "two", 2)
    engine.load_adapter("one", str(one))
    engine.load_adapter("two", str(two))
    before = {name: _logits(engine, name) for name in ("tiny", "one", "two")}
    broken = _broken_adapter(one, tmp_path / "broken")
    with pytest.raises(EngineError):
        engine.load_adapter("three", str(broken))
    with pytest.raises(EngineError):
        engine.load_adapter("one", str(broken), inplace=True)
    assert engine.model_names() == ["tiny", "one", "two"]
    assert engine.adapters["one"]["path"] == str(one)
    for name, logits in before.items():
        assert torch.equal(_logits(engine, name), logits), name
    assert set(engine.model.peft_config) == {engine.adapters[n]["internal"] for n in ("one", "two")}


def test_adapter_routes_need_the_admin_token_and_model_routes_the_api_key(
    guarded: tuple[str, Any], tiny_llama_dir: Path, tmp_path: Path
) -> None:
    url, engine = guarded
    adapter = _peft_adapter(tiny_llama_dir, tmp_path / "ad", 3)
    body = {"lora_name": "ad", "lora_path": str(adapter)}
    for headers in ({}, {"Authorization": f"Bearer {KEY}"}, {"Authorization": "Bearer x" * 3}):
        refused = httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=headers)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["type"] == "authentication_error"
    assert engine.model_names() == ["tiny"]
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=admin).status_code == 200
    ask = {"model": "ad", "prompt": "goal", "max_tokens": 2}
    assert httpx.post(f"{url}/v1/completions", json=ask).status_code == 401
    assert httpx.get(f"{url}/v1/models").status_code == 401
    user = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(f"{url}/v1/completions", json=ask, headers=user).status_code == 200
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    unload = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "ad"}, headers=user)
    assert unload.status_code == 401 and engine.model_names() == ["tiny", "ad"]


def test_bodies_and_prompts_are_capped_before_tokenizing(
    guarded: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, engine = guarded
    calls: list[int] = []
    real = engine.encode_prompt
    monkeypatch.setattr(engine, "encode_prompt", lambda text: calls.append(len(text)) or real(text))
    user = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    big = json.dumps({"model": "tiny", "prompt": "x" * 10_000, "max_tokens": 1}).encode()
    declared = httpx.post(f"{url}/v1/completions", content=big, headers=user)
    assert (
        declared.status_code == 413 and "exceeds 4096 bytes" in declared.json()["error"]["message"]
    )

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap applies while reading
        for start in range(0, len(big), 1000):
            yield big[start : start + 1000]

    streamed = httpx.post(f"{url}/v1/completions", content=chunks(), headers=user)
    assert streamed.status_code == 413, streamed.text
    long_prompt = {"model": "tiny", "prompt": "ab " * 1000, "max_tokens": 1}  # 3000 chars
    wordy = httpx.post(f"{url}/v1/completions", json=long_prompt, headers=user)
    assert wordy.status_code == 400 and "characters" in wordy.json()["error"]["message"]
    assert calls == []  # nothing above was tokenized
    assert httpx.get(f"{url}/health").status_code == 200


def test_tokenizing_runs_off_the_event_loop(
    guarded: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """/health answers while a request is being tokenized: the tokenizer waits for it."""
    url, engine = guarded
    health_answered = threading.Event()
    real = engine.encode_prompt

    def waiting(text: str) -> list[int]:
        assert health_answered.wait(timeout=30), "/health was stalled by tokenizing"
        return real(text)

    monkeypatch.setattr(engine, "encode_prompt", waiting)
    user = {"Authorization": f"Bearer {KEY}"}
    result: dict[str, int] = {}

    def ask() -> None:
        answer = httpx.post(
            f"{url}/v1/completions",
            json={"model": "tiny", "prompt": "goal", "max_tokens": 1},
            headers=user,
            timeout=60,
        )
        result["status"] = answer.status_code

    worker = threading.Thread(target=ask)
    worker.start()
    time.sleep(0.3)  # let the completion reach the tokenizer first
    assert httpx.get(f"{url}/health", timeout=20).status_code == 200
    health_answered.set()
    worker.join(timeout=60)
    assert result == {"status": 200}


def test_every_error_is_openai_shaped(
    guarded: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, engine = guarded
    user = {"Authorization": f"Bearer {KEY}"}
    for answer, status in (
        (httpx.get(f"{url}/no/such/route"), 404),
        (httpx.get(f"{url}/v1/completions", headers=user), 405),
    ):
        assert answer.status_code == status
        error = answer.json()["error"]
        assert error["code"] == status and error["message"] and error["type"]

    def crash(name: str) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "check_model", crash)
    broken = httpx.post(
        f"{url}/v1/completions", json={"model": "tiny", "prompt": "x"}, headers=user
    )
    assert broken.status_code == 500
    assert broken.json()["error"] == {
        "message": "internal error: RuntimeError",
        "type": "server_error",
        "param": None,
        "code": 500,
    }
    assert httpx.get(f"{url}/health").status_code == 200


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "offsite.cli.main", "serve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.integration  # a real `offsite` process end to end
def test_the_cli_refuses_to_expose_adapter_routes_without_an_admin_token(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    refused = _cli("-m", str(tiny_llama_dir), "--host", "0.0.0.0", "--port", "0")
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "--admin-token-file" in refused.stderr
    short = tmp_path / "short"
    short.write_text("abc")
    weak = _cli("-m", str(tiny_llama_dir), "--admin-token-file", str(short))
    assert weak.returncode == 2 and "16 characters" in weak.stderr


@pytest.mark.integration  # a real `offsite` process end to end
def test_port_zero_prints_the_port_it_bound(tiny_llama_dir: Path) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "offsite.cli.main",
            "serve",
            "-m",
            str(tiny_llama_dir),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "http://127.0.0.1:" in line and ":0/" not in line, line
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
                break
            except httpx.ConnectError:
                time.sleep(0.2)
        else:
            raise AssertionError(f"nothing answers on the printed port {port}")
    finally:
        process.terminate()
        process.wait(timeout=30)
