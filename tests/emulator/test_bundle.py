"""Bundle verification: any tampering is caught before a tensor is materialised."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from emulator.adapter import AdapterSpec
from emulator.arch import arch_spec
from emulator.bundle import (
    ADAPTER_FILE,
    EMULATOR_FILE,
    MANIFEST,
    Bundle,
    read_manifest,
    verify_bundle,
    write_bundle,
)
from emulator.layers import plan_layers
from emulator.safetensors_header import read_header
from offsite.errors import IntegrityError
from tests.conftest import LAYER_DROP, VOCAB, tiny_model


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Bundle:
    model = tiny_model("llama")
    plan = plan_layers(6, 1, 1, 2)
    spec = AdapterSpec("lora", plan.adapter_layers, 4, 8, arch_spec(model.config).lora_targets)
    return write_bundle(
        model, tokenizer, plan, spec, tmp_path_factory.mktemp("b") / "b", source="t"
    )


@pytest.fixture()
def copy(pristine: Bundle, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(pristine.path, target)
    return target


def test_pristine_bundle_verifies_and_digest_is_stable(pristine: Bundle) -> None:
    verified = verify_bundle(pristine.path, pristine.digest)
    assert verified.digest == pristine.digest
    manifest = read_manifest(pristine.path)
    assert set(manifest["files"]) >= {ADAPTER_FILE, EMULATOR_FILE, "config.json"}
    assert manifest["layers"]["emulator_layers"] == [0, 1, 4, 5]
    assert manifest["compression"]["kept_middle"] == 2


def test_fifty_single_byte_flips_are_all_rejected_naming_the_file(copy: Path) -> None:
    rng = random.Random(0)
    files = sorted(p for p in copy.iterdir() if p.name != MANIFEST)
    for trial in range(50):
        target = files[trial % len(files)]
        data = bytearray(target.read_bytes())
        offset = rng.randrange(len(data))
        data[offset] ^= 1 << rng.randrange(8)
        original = target.read_bytes()
        target.write_bytes(bytes(data))
        with pytest.raises(IntegrityError, match=target.name):
            verify_bundle(copy)
        target.write_bytes(original)
    verify_bundle(copy)  # restored: valid again


def test_manifest_edit_changes_the_digest(copy: Path, pristine: Bundle) -> None:
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["adapter"]["lora_r"] = 64
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="digest"):
        verify_bundle(copy, pristine.digest)


def test_missing_and_unlisted_files_are_rejected(copy: Path) -> None:
    (copy / "extra.bin").write_bytes(b"x")
    with pytest.raises(IntegrityError, match="unlisted"):
        verify_bundle(copy)
    (copy / "extra.bin").unlink()
    (copy / ADAPTER_FILE).unlink()
    with pytest.raises(IntegrityError, match="missing"):
        verify_bundle(copy)


def test_swapped_files_with_edited_manifest_fail_header_check(copy: Path) -> None:
    """Swap adapter/emulator and fix the file digests: the tensor headers still disagree."""
    a, e = copy / ADAPTER_FILE, copy / EMULATOR_FILE
    a_bytes, e_bytes = a.read_bytes(), e.read_bytes()
    a.write_bytes(e_bytes)
    e.write_bytes(a_bytes)
    manifest = json.loads((copy / MANIFEST).read_text())
    files = manifest["files"]
    files[ADAPTER_FILE], files[EMULATOR_FILE] = files[EMULATOR_FILE], files[ADAPTER_FILE]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="not in the manifest"):
        verify_bundle(copy)


def test_path_traversal_names_are_rejected(copy: Path) -> None:
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"]["../escape"] = {"sha256": "0" * 64, "size": 1}
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="unsafe"):
        verify_bundle(copy)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(IntegrityError, match=r"manifest\.json is missing"):
        verify_bundle(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(IntegrityError, match="not valid JSON"):
        verify_bundle(tmp_path)


@pytest.mark.parametrize(
    "blob",
    [
        b"",  # truncated
        (10**12).to_bytes(8, "little") + b"{}",  # header length beyond the file
        (2).to_bytes(8, "little") + b"[]",  # header not an object
        (60).to_bytes(8, "little")
        + b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}    ',  # offsets past the end
    ],
)
def test_malformed_safetensors_headers_raise_integrity_errors(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob)
    with pytest.raises(IntegrityError):
        read_header(path)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_embeddings_ship_once_load_everywhere_and_are_counted_by_part(
    mode: str, tmp_path: Path, tokenizer
) -> None:
    """A tied embedding ships once, quantized per token row; both runtimes load it back to
    floats within half a quantization step; the report's parts add up to the bundle."""
    from client.runtime.load import bundle_lean_config, load_lean_model
    from emulator.build import build_bundle
    from emulator.bundle import bundle_parts, load_bundle_model
    from emulator.embeddings import embedding_names
    from emulator.split import build_emulator
    from offsite.config import EmulatorConfig

    full = tiny_model("llama")  # tied embeddings
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 2)
    spec = AdapterSpec.for_plan("lora", plan, arch, 4, 8)
    settings = EmulatorConfig(
        bottom=1,
        top=1,
        keep=2,
        public_text="",
        embeddings=mode,
        **LAYER_DROP,
    )
    bundle = build_bundle(
        full, tokenizer, arch, plan, spec, tmp_path / "b", source="tiny", settings=settings
    )
    entry = bundle.manifest["compression"]["embeddings"]
    assert entry["tensors"] == embedding_names(full) == ["model.embed_tokens.weight"]
    tensors = bundle.manifest["tensors"]
    assert "model.embed_tokens.weight" not in tensors and "lm_head.weight" not in tensors
    assert tensors["model.embed_tokens.weight.qweight"]["dtype"] == (
        "I8" if mode == "int8" else "U8"
    )
    assert entry["bytes"] < entry["bytes_before"] / (3.5 if mode == "int8" else 5)
    parts = bundle_parts(bundle.manifest)
    files = bundle.manifest["files"]
    weights = sum(int(f["size"]) for n, f in files.items() if n.endswith(".safetensors"))
    tensor_parts = parts["embeddings"] + parts["adapter blocks"] + parts["middle blocks"]
    tensor_parts += parts["other tensors"]
    assert weights - 64 * 1024 < tensor_parts <= weights  # all but the safetensors headers
    assert parts["tokenizer and config"] == sum(int(f["size"]) for f in files.values()) - weights
    assert parts["embeddings"] == entry["bytes"] and parts["middle blocks"] > 0
    reference = build_emulator(full, plan, arch)
    table = full.get_input_embeddings().weight
    step = table.abs().amax(1, keepdim=True) / (127 if mode == "int8" else 7)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    loaded = [load_bundle_model(verify_bundle(bundle.path))]
    config, why = bundle_lean_config(bundle)
    assert config is not None, why
    loaded.append(load_lean_model(verify_bundle(bundle.path), config))
    for model in loaded:
        weight = model.get_input_embeddings().weight
        assert (weight - table).abs().le(step).all()
        assert model.lm_head.weight.data_ptr() == weight.data_ptr()  # tied: one tensor
        with torch.no_grad():
            got, want = model(input_ids=ids).logits, reference(input_ids=ids).logits
        assert torch.allclose(got, want, atol=0.1), (got - want).abs().max()
