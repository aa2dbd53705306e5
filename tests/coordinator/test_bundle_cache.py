"""The emulator bundle cache: a second run with the same weights and settings copies the
bundle instead of building it; anything that changes the bundle changes the key; a damaged
entry is rebuilt, never used."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from coordinator.models import load_full_model
from coordinator.workflow.bundle_cache import bundle_key, reuse_or_build
from emulator.bundle import verify_bundle
from offsite.config import load_config
from offsite.host.paths import bundle_folder


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "bundles"
    monkeypatch.setenv("OFFSITE_BUNDLES", str(folder))
    return folder


def _config(model_dir: Path, *overrides: str):
    return load_config(
        None,
        [
            f"model.name='{model_dir}'",
            "emulator.bottom=1",
            "emulator.top=1",
            "emulator.keep=2",
            "emulator.factorize='none'",
            "emulator.quantize='none'",
            "emulator.public_text=''",
            "train.lora_r=4",
            *overrides,
        ],
    )


def test_a_second_build_with_the_same_settings_is_a_verified_copy(
    tiny_llama_dir: Path, tmp_path: Path, cache: Path
) -> None:
    model, tokenizer, arch, _ = load_full_model(str(tiny_llama_dir))
    config = _config(tiny_llama_dir)
    _, first, hit = reuse_or_build(model, tokenizer, arch, config, tmp_path / "a", "w1")
    assert not hit and bundle_folder() == cache
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1  # and its .digest
    plan, second, hit = reuse_or_build(model, tokenizer, arch, config, tmp_path / "b", "w1")
    assert hit and second.digest == first.digest and second.path == tmp_path / "b"
    assert plan == first.plan
    verify_bundle(second.path, first.digest)
    # other weights, another adapter rank or another emulator: another bundle
    key = bundle_key("w1", config)
    assert bundle_key("w2", config) != key
    assert bundle_key("w1", _config(tiny_llama_dir, "train.lora_r=8")) != key
    assert bundle_key("w1", _config(tiny_llama_dir, "emulator.keep=1")) != key
    # what does not change the bundle does not change the key
    assert bundle_key("w1", _config(tiny_llama_dir, "federation.num_clients=100")) == key
    assert bundle_key("w1", _config(tiny_llama_dir, "emulator.reuse_bundle=false")) == key


def test_a_damaged_entry_is_rebuilt_and_reuse_off_always_builds(
    tiny_llama_dir: Path, tmp_path: Path, cache: Path
) -> None:
    model, tokenizer, arch, _ = load_full_model(str(tiny_llama_dir))
    config = _config(tiny_llama_dir)
    _, built, _ = reuse_or_build(model, tokenizer, arch, config, tmp_path / "a", "w1")
    entry = cache / bundle_key("w1", config)
    tensors = sorted(entry.glob("*.safetensors"))
    assert tensors
    data = bytearray(tensors[0].read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the cached copy
    tensors[0].write_bytes(bytes(data))
    _, again, hit = reuse_or_build(model, tokenizer, arch, config, tmp_path / "b", "w1")
    assert not hit and again.digest == built.digest
    verify_bundle(entry, built.digest)  # the rebuilt entry replaced the damaged one
    # a bundle planted with its own consistent manifest is not the recorded one: not used
    planted = tmp_path / "planted"
    _, other, _ = reuse_or_build(
        model, tokenizer, arch, _config(tiny_llama_dir, "emulator.keep=1"), planted, "w9"
    )
    shutil.rmtree(entry)
    shutil.copytree(other.path, entry)
    _, again, hit = reuse_or_build(model, tokenizer, arch, config, tmp_path / "b2", "w1")
    assert not hit and again.digest == built.digest
    off = _config(tiny_llama_dir, "emulator.reuse_bundle=false")
    _, _, hit = reuse_or_build(model, tokenizer, arch, off, tmp_path / "c", "w1")
    assert not hit


def test_the_cache_keeps_the_most_recently_used_entries(
    tiny_llama_dir: Path, tmp_path: Path, cache: Path
) -> None:
    from coordinator.workflow import bundle_cache

    model, tokenizer, arch, _ = load_full_model(str(tiny_llama_dir))
    config = _config(tiny_llama_dir)
    for index in range(bundle_cache.MAX_ENTRIES + 1):
        reuse_or_build(model, tokenizer, arch, config, tmp_path / str(index), f"w{index}")
    kept = {p.name for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert len(kept) == bundle_cache.MAX_ENTRIES
    assert bundle_key("w0", config) not in kept  # the oldest went first
    assert bundle_key(f"w{bundle_cache.MAX_ENTRIES}", config) in kept


def test_a_cache_others_can_write_is_not_used(
    tiny_llama_dir: Path, tmp_path: Path, cache: Path
) -> None:
    """A cached bundle is signed and shipped: a folder others can write could plant one."""
    model, tokenizer, arch, _ = load_full_model(str(tiny_llama_dir))
    config = _config(tiny_llama_dir)
    reuse_or_build(model, tokenizer, arch, config, tmp_path / "a", "w1")
    os.chmod(cache, 0o777)
    _, _, hit = reuse_or_build(model, tokenizer, arch, config, tmp_path / "b", "w1")
    assert not hit
    os.chmod(cache, 0o700)
    _, _, hit = reuse_or_build(model, tokenizer, arch, config, tmp_path / "c", "w1")
    assert hit
    assert not (cache.stat().st_mode & 0o077) and not (
        (cache / bundle_key("w1", config)).stat().st_mode & 0o077
    )


def test_the_key_follows_a_public_text_files_content(tiny_llama_dir: Path, tmp_path: Path) -> None:
    public = tmp_path / "public.jsonl"
    public.write_text('{"completion": "one public text"}\n')
    config = _config(tiny_llama_dir, f"emulator.public_text='{public}'")
    first = bundle_key("w1", config)
    public.write_text('{"completion": "another public text"}\n')
    assert bundle_key("w1", config) != first
