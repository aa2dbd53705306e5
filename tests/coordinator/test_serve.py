"""`offsite serve` against the official openai client, on 127.0.0.1 with a free port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch


def _peft_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter for the tiny base model, saved in the PEFT layout."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(out)
    return out


def serving(engine: Any, **options: Any) -> Iterator[str]:
    """``offsite serve``'s app for ``engine`` on a free loopback port (a generator: one URL)."""
    import uvicorn

    from coordinator.serve import build_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(engine, **options), log_level="critical"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture()
def server(tiny_llama_dir: Path) -> Iterator[tuple[str, object]]:
    from coordinator.serve import Engine

    engine = Engine(tiny_llama_dir, "tiny", max_prompt_tokens=64)
    for url in serving(engine):
        yield url, engine


def test_completion_chat_stream_and_adapter_hot_swap(
    server, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    import openai

    base_url, _ = server
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0)

    assert [m.id for m in client.models.list()] == ["tiny"]
    done = client.completions.create(
        model="tiny", prompt="shares market", max_tokens=5, temperature=0
    )
    assert done.choices[0].finish_reason in {"length", "stop"}
    assert done.usage.completion_tokens <= 5 and done.usage.prompt_tokens > 0
    again = client.completions.create(
        model="tiny", prompt="shares market", max_tokens=5, temperature=0
    )
    assert again.choices[0].text == done.choices[0].text  # greedy is deterministic

    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"

    stream = client.completions.create(
        model="tiny", prompt="shares market", max_tokens=5, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason
    chat_stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        stream=True,
        temperature=0,
    )
    assert "".join(c.choices[0].delta.content or "" for c in chat_stream) == (
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
        )
        .choices[0]
        .message.content
    )

    # hot-swap: load -> the adapter is a model name and changes the output -> unload -> 404
    adapter = _peft_adapter(tiny_llama_dir, tmp_path / "ad", seed=1)
    loaded = httpx.post(
        f"{base_url}/v1/load_lora_adapter", json={"lora_name": "bbc", "lora_path": str(adapter)}
    )
    assert loaded.status_code == 200, loaded.text
    assert {m.id for m in client.models.list()} == {"tiny", "bbc"}
    tuned = client.completions.create(
        model="bbc", prompt="shares market", max_tokens=5, temperature=0
    )
    base_again = client.completions.create(
        model="tiny", prompt="shares market", max_tokens=5, temperature=0
    )
    assert base_again.choices[0].text == done.choices[0].text  # base unaffected by the adapter
    assert tuned.choices[0].text != done.choices[0].text
    assert (
        httpx.post(f"{base_url}/v1/unload_lora_adapter", json={"lora_name": "bbc"}).status_code
        == 200
    )
    with pytest.raises(openai.NotFoundError, match="bbc"):
        client.completions.create(model="bbc", prompt="x", max_tokens=2)


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, tmp_path: Path) -> None:
    import openai

    base_url, _ = server
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="limit is 64"):
        client.completions.create(model="tiny", prompt="market " * 200, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=0)
    malformed = httpx.post(
        f"{base_url}/v1/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert malformed.status_code == 400 and "error" in malformed.json()
    missing = httpx.post(
        f"{base_url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path)}
    )
    assert missing.status_code == 400 and "adapter_config.json" in missing.text
    assert (
        httpx.post(f"{base_url}/v1/unload_lora_adapter", json={"lora_name": "x"}).status_code == 404
    )
    ok = client.completions.create(model="tiny", prompt="shares", max_tokens=2)
    assert ok.choices[0].finish_reason in {"length", "stop"}


def test_stop_strings_are_never_emitted(server) -> None:
    import openai

    base_url, _ = server
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0)
    free = client.completions.create(
        model="tiny", prompt="team match", max_tokens=12, temperature=0
    )
    text = free.choices[0].text
    assert len(text) >= 4
    stop = text[2:4]
    cut = client.completions.create(
        model="tiny", prompt="team match", max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="tiny", prompt="team match", max_tokens=12, temperature=0, stop=[stop], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_inplace_replace_and_base_after_last_unload(
    server, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    import openai

    base_url, _ = server
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0)
    base = client.completions.create(model="tiny", prompt="goal", max_tokens=6, temperature=0)
    one = _peft_adapter(tiny_llama_dir, tmp_path / "one", seed=1)
    two = _peft_adapter(tiny_llama_dir, tmp_path / "two", seed=2)
    load = f"{base_url}/v1/load_lora_adapter"
    assert httpx.post(load, json={"lora_name": "ad", "lora_path": str(one)}).status_code == 200
    first = client.completions.create(model="ad", prompt="goal", max_tokens=6, temperature=0)
    refused = httpx.post(load, json={"lora_name": "ad", "lora_path": str(two)})
    assert refused.status_code == 400 and "load_inplace" in refused.text
    swapped = httpx.post(
        load, json={"lora_name": "ad", "lora_path": str(two), "load_inplace": True}
    )
    assert swapped.status_code == 200
    second = client.completions.create(model="ad", prompt="goal", max_tokens=6, temperature=0)
    assert second.choices[0].text != first.choices[0].text
    assert (
        httpx.post(f"{base_url}/v1/unload_lora_adapter", json={"lora_name": "ad"}).status_code
        == 200
    )
    after = client.completions.create(model="tiny", prompt="goal", max_tokens=6, temperature=0)
    assert after.choices[0].text == base.choices[0].text  # the base model is intact


@pytest.mark.integration
def test_federation_pushes_every_round_to_a_running_server(
    server, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    import openai

    from coordinator.workflow.simulate import simulate
    from offsite.config import load_config
    from offsite.data import Example, write_jsonl
    from tests.conftest import LABELS, tiny_texts

    base_url, engine = server
    data = tmp_path / "task.jsonl"
    write_jsonl([Example(t, label=lab) for lab in LABELS for t in tiny_texts(lab, 20)], data)
    config = load_config(
        None,
        [
            f"model.name='{tiny_llama_dir}'",
            f"data.name='{data}'",
            "data.eval_size=9",
            "emulator.bottom=1",
            "emulator.top=1",
            "emulator.keep=2",
            "federation.num_clients=2",
            "federation.rounds=2",
            f"federation.serve_url='{base_url}'",
            "train.local_steps=2",
            "train.lr=0.01",
            "train.precision='fp32'",
            f"output_dir='{tmp_path / 'runs'}'",
        ],
    )
    result = simulate(config)
    assert (result.run_dir / "peft" / "round-1" / "adapter_config.json").is_file()
    assert engine.adapters["federated"]["path"] == str(result.run_dir / "peft" / "round-2")
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0)
    served = client.completions.create(model="federated", prompt="shares", max_tokens=3)
    assert served.choices[0].finish_reason in {"length", "stop"}


def test_client_disconnect_mid_stream_releases_the_model(server) -> None:
    base_url, _ = server
    body = {"model": "tiny", "prompt": "team", "max_tokens": 64, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # hang up after the first chunk
    after = httpx.post(
        f"{base_url}/v1/completions",
        json={"model": "tiny", "prompt": "goal", "max_tokens": 2},
        timeout=30,  # a leaked model lock would make this time out
    )
    assert after.status_code == 200
