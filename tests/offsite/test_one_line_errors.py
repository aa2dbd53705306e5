"""Bad input the README promises one-line errors for: real commands, exit codes, no traceback.

Text files in other encodings, malformed or symlinked manifests, pickle-only model folders,
nonsense token lifetimes and seeds, path-like digests; `emulator verify --key` checks the
signature and says what it did not check.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from emulator.adapter import AdapterSpec
from emulator.arch import arch_spec
from emulator.bundle import sign_bundle, write_bundle
from emulator.layers import plan_layers
from offsite.data import load_task
from offsite.errors import DataError
from tests.conftest import tiny_model
from tests.offsite.test_cli import offsite


def _one_line(result, code: int, fragment: str) -> None:
    assert result.returncode == code, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "│" not in result.stderr  # no usage box


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    root = tmp_path_factory.mktemp("bundle")
    full = tiny_model("llama")
    plan = plan_layers(6, 1, 1, 2)
    spec = AdapterSpec.for_plan("lora", plan, arch_spec(full.config), 4, 8)
    return write_bundle(full, tokenizer, plan, spec, root / "bundle", source="tiny").path


def _copy(bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(bundle, out)
    return out


def test_jsonl_in_other_encodings(tmp_path: Path) -> None:
    rows = '{"text": "café au lait", "label": "food"}\n{"text": "le match", "label": "sport"}\n'
    (tmp_path / "utf16.jsonl").write_bytes(rows.encode("utf-16"))
    (tmp_path / "bom.jsonl").write_bytes(rows.encode("utf-8-sig"))
    for name in ("utf16.jsonl", "bom.jsonl"):
        task = load_task(str(tmp_path / name))
        assert [e.text for e in task.examples] == ["café au lait", "le match"], name
    (tmp_path / "latin1.jsonl").write_bytes(rows.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl:1 is not UTF-8 text \(byte 0xe9\)"):
        load_task(str(tmp_path / "latin1.jsonl"))
    separator = '{"text": "a\u2028b", "label": "x"}\n{"text": "c", "label": "y"}\n'
    (tmp_path / "ls.jsonl").write_text(separator, encoding="utf-8")
    assert [e.text for e in load_task(str(tmp_path / "ls.jsonl")).examples] == ["a\u2028b", "c"]
    _one_line(offsite("simulate", f"data.name={tmp_path / 'latin1.jsonl'}"), 3, "not UTF-8")


def _set(path: Path, edit: Callable[[dict], None]) -> None:
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda m: m["files"].update({"adapter.safetensors": "abc"}), "file entry"),
        (lambda m: m["tensors"].update({next(iter(m["tensors"])): 5}), "tensor entry"),
        (lambda m: next(iter(m["tensors"].values())).update({"shape": ["x"]}), "tensor entry"),
        (lambda m: m["layers"].update({"bottom": "zero"}), "'layers' section is malformed"),
        (lambda m: m["adapter"].pop("kind"), "'adapter' section is malformed"),
        (lambda m: m.update({"tensors": []}), "lacks the 'tensors' section"),
    ],
)
def test_malformed_manifest_types_are_one_line_integrity_errors(
    bundle: Path, tmp_path: Path, edit: Callable[[dict], None], fragment: str
) -> None:
    copy = _copy(bundle, tmp_path)
    _set(copy / "manifest.json", edit)
    _one_line(offsite("emulator", "verify", str(copy)), 5, fragment)


def test_a_symlinked_manifest_is_refused(bundle: Path, tmp_path: Path) -> None:
    copy = _copy(bundle, tmp_path)
    (tmp_path / "elsewhere.json").write_bytes((copy / "manifest.json").read_bytes())
    (copy / "manifest.json").unlink()
    (copy / "manifest.json").symlink_to(tmp_path / "elsewhere.json")
    _one_line(offsite("emulator", "verify", str(copy)), 5, "symbolic link")


def test_verify_key_checks_the_signature_and_says_what_was_not_checked(
    bundle: Path, tmp_path: Path
) -> None:
    copy = _copy(bundle, tmp_path)
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    unsigned = offsite("emulator", "verify", str(copy))
    assert unsigned.returncode == 0 and "signature: none" in unsigned.stdout
    assert "digest: not pinned" in unsigned.stdout
    _one_line(offsite("emulator", "verify", str(copy), "--key", raw), 5, "is not signed")
    sign_bundle(copy, key)
    present = offsite("emulator", "verify", str(copy))
    assert "signature: present, NOT checked" in present.stdout
    digest = present.stdout.split()[1]
    (tmp_path / "key.hex").write_text(raw + "\n")
    checked = offsite(
        "emulator", "verify", str(copy), "--key", str(tmp_path / "key.hex"), "--digest", digest
    )
    assert checked.returncode == 0, checked.stderr
    assert "signature: valid" in checked.stdout and "not pinned" not in checked.stdout
    other = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    _one_line(offsite("emulator", "verify", str(copy), "--key", other.hex()), 5, "does not verify")
    _one_line(offsite("emulator", "verify", str(copy), "--key", "abc"), 2, "64 hex")
    _one_line(offsite("emulator", "verify", str(copy), "--digest", "../x"), 5, "not a sha256")


@pytest.mark.integration  # a real `offsite` process end to end
def test_a_model_folder_with_only_pickle_weights(tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    model = tiny_model("llama")
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    result = offsite("emulator", "build", "-o", str(tmp_path / "b"), f"model.name={folder}")
    _one_line(result, 4, "convert")
    assert "pickle" in result.stderr and "safetensors" in result.stderr


def test_token_lifetimes_that_mean_nothing_are_refused(tmp_path: Path) -> None:
    state = tmp_path / "coordinator"
    assert offsite("coordinator", "init", "--state", str(state)).returncode == 0
    for hours in ("nan", "inf", "1e12", "-1", "0"):
        _one_line(
            offsite("coordinator", "token", "--state", str(state), "--hours", hours), 2, "--hours"
        )
    assert offsite("coordinator", "token", "--state", str(state), "--hours", "0.5").returncode == 0


@pytest.mark.parametrize("seed", ["-1", "2147483648", "99999999999999999999"])
def test_a_seed_out_of_range_is_a_config_error(seed: str) -> None:
    _one_line(offsite("simulate", f"seed={seed}"), 2, "seed")


def test_an_unsafe_aggregation_combination_is_a_config_error() -> None:
    """Refused before anything runs: merge-exact restarts LoRA, a sparse residual cannot
    follow it."""
    merge = "federation.lora_aggregation=merge-exact"
    _one_line(offsite("simulate", merge, "train.upload=sparse"), 2, "train.upload='dense'")


@pytest.mark.parametrize(
    ("artifact", "bundle_digest"), [("../../etc", "ab" * 32), ("ab" * 32, "../cache/x")]
)
def test_client_fetch_refuses_path_like_digests(
    artifact: str, bundle_digest: str, tmp_path: Path
) -> None:
    result = offsite("client", "fetch", artifact, bundle_digest, "--state", str(tmp_path / "n"))
    _one_line(result, 5, "not a sha256 digest")
    assert not (tmp_path / "n").exists() and not (tmp_path / "etc").exists()
