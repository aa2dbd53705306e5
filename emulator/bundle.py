"""The bundle a model owner ships to data owners: adapter + emulator + tokenizer + manifest.

Layout (a Hugging Face sharded checkpoint plus a manifest, so ``from_pretrained`` loads it)::

    manifest.json                   what the bundle is; per-file and per-tensor sha256
    config.json                     the emulator's config (blocks renumbered 0..m-1)
    model.safetensors.index.json    tensor -> file map (HF sharded layout)
    adapter.safetensors             adapter blocks (the starting point of training)
    emulator.safetensors            embeddings, kept middle blocks, final norm, head
    tokenizer files

Decisions:
- The bundle digest is the sha256 of the canonical manifest; the manifest pins every file's
  sha256, so verifying the manifest digest and then each file pins every byte.
- Verification happens before any tensor is materialised: file digests, the file list (nothing
  missing, nothing extra, no paths outside the folder), then every safetensors header against the
  manifest's names, dtypes and shapes.
- Written into a sibling ``.partial`` folder and renamed, so a crash never leaves half a bundle.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from emulator.adapter import AdapterSpec
from emulator.arch import ArchSpec, arch_spec, block_prefix, hf_model, model_config
from emulator.digest import canonical_json, file_sha256, tensor_sha256
from emulator.embeddings import expand_embeddings
from emulator.layers import LayerPlan, block_index
from emulator.safetensors_header import read_header
from emulator.split import emulator_config, emulator_state, unique_state
from emulator.tokenizers import Tokenizer
from offsite.crypto import SIGNATURE_BYTES, SignatureError, SigningKey, sign, verify
from offsite.errors import IntegrityError

FORMAT = "offsite-bundle/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"  # Ed25519 over the canonical manifest (the bundle digest's input)
ADAPTER_FILE = "adapter.safetensors"
EMULATOR_FILE = "emulator.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024

_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: dict[str, Any]
    digest: str

    @property
    def plan(self) -> LayerPlan:
        return LayerPlan.from_dict(self.manifest["layers"])

    @property
    def adapter(self) -> AdapterSpec:
        return AdapterSpec.from_dict(self.manifest["adapter"])

    @property
    def model_type(self) -> str:
        return str(self.manifest["model"]["model_type"])

    @property
    def nbytes(self) -> int:
        """The bundle's size: its files as the manifest lists them."""
        return sum(int(f["size"]) for f in self.manifest["files"].values())


def manifest_digest(manifest: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(canonical_json(manifest)).hexdigest()


def write_bundle(
    full_model: nn.Module,
    tokenizer: Tokenizer,
    plan: LayerPlan,
    adapter: AdapterSpec,
    out_dir: Path,
    *,
    source: str,
    compression: dict[str, Any] | None = None,
    privacy: dict[str, Any] | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
) -> Bundle:
    """Write the bundle for ``full_model`` split by ``plan`` into ``out_dir`` (atomically).

    ``state`` (emulator numbering, e.g. a distilled emulator's ``unique_state``) replaces the
    plain layer-dropped weights; by default they are taken from ``full_model``.
    """
    arch = arch_spec(model_config(full_model))
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    if state is None:
        state = emulator_state(full_model, plan, arch)
    prefix = block_prefix(full_model, arch)
    adapter_local = set(plan.adapter_layers_in_emulator())
    shards: dict[str, dict[str, torch.Tensor]] = {ADAPTER_FILE: {}, EMULATOR_FILE: {}}
    for key, tensor in state.items():
        index = block_index(key, prefix)
        target = ADAPTER_FILE if index is not None and index in adapter_local else EMULATOR_FILE
        shards[target][key] = tensor.detach().contiguous().cpu()
    tensors: dict[str, Any] = {}
    for file_name, shard in shards.items():
        save_file(shard, str(staging / file_name), metadata={"format": "pt"})
        for key, tensor in shard.items():
            tensors[key] = {
                "file": file_name,
                "dtype": _DTYPES[tensor.dtype],
                "shape": list(tensor.shape),
                "sha256": tensor_sha256(tensor),
            }
    weight_map = {key: meta["file"] for key, meta in sorted(tensors.items())}
    (staging / INDEX_FILE).write_text(
        json.dumps({"metadata": {"format": "offsite-bundle"}, "weight_map": weight_map}, indent=1)
    )
    config = emulator_config(model_config(full_model), plan, arch)
    config.architectures = [type(full_model).__name__]
    config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)

    files = {
        p.name: {"sha256": file_sha256(p), "size": p.stat().st_size}
        for p in sorted(staging.iterdir())
        if p.is_file()
    }
    tokenizer_files = sorted(
        n for n in files if n.startswith(("tokenizer", "special_tokens", "vocab", "merges"))
    )
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {
            "source": source,
            "model_type": model_config(full_model).model_type,
            "architecture": type(full_model).__name__,
            "auto_class": arch.auto_class,
            "num_layers": plan.num_layers,
            "block_prefix": prefix,
        },
        "layers": {**plan.to_dict(), "emulator_layers": list(plan.emulator_layers)},
        "adapter": adapter.to_dict(),
        "compression": compression
        or {"method": "uniform-layer-drop", "kept_middle": len(plan.middle_kept)},
        "files": files,
        "tensors": tensors,
        "tokenizer_files": tokenizer_files,
    }
    if privacy is not None:
        manifest["privacy"] = privacy
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return Bundle(out_dir, manifest, manifest_digest(manifest))


def read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = Path(path) / MANIFEST
    if manifest_path.is_symlink():
        raise IntegrityError(f"{manifest_path} is a symbolic link; a bundle holds regular files")
    if not manifest_path.is_file():
        raise IntegrityError(
            f"{path} is not a bundle: {MANIFEST} is missing; rebuild it with "
            "`offsite emulator build`"
        )
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise IntegrityError(f"{manifest_path} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IntegrityError(f"{manifest_path} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IntegrityError(f"{manifest_path} is not an {FORMAT} manifest")
    for key in ("model", "layers", "adapter", "files", "tensors"):
        if not isinstance(manifest.get(key), dict):
            raise IntegrityError(f"{manifest_path} lacks the {key!r} section")
    _check_entries(manifest_path, manifest)
    return manifest


def _check_entries(manifest_path: Path, manifest: dict[str, Any]) -> None:
    """Every file and tensor entry has the types verification relies on (one-line errors)."""
    for name, meta in manifest["files"].items():
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
            raise IntegrityError(f"{manifest_path}: file entry {str(name)[:60]!r} is malformed")
    for name, meta in manifest["tensors"].items():
        shape = meta.get("shape") if isinstance(meta, dict) else None
        if (
            not isinstance(meta, dict)
            or not isinstance(meta.get("file"), str)
            or not isinstance(meta.get("dtype"), str)
            or not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        ):
            raise IntegrityError(f"{manifest_path}: tensor entry {str(name)[:60]!r} is malformed")
    for section, parse in (("layers", LayerPlan.from_dict), ("adapter", AdapterSpec.from_dict)):
        try:
            parse(manifest[section])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise IntegrityError(
                f"{manifest_path}: the {section!r} section is malformed ({err!r:.80})"
            ) from err


def sign_bundle(path: Path | str, private_key: SigningKey) -> None:
    """Sign a written bundle's canonical manifest with the owner's Ed25519 key."""
    manifest = read_manifest(Path(path))
    (Path(path) / SIGNATURE).write_bytes(sign(private_key, canonical_json(manifest)))


def verify_bundle(
    path: Path | str, expected_digest: str | None = None, signing_key: bytes | None = None
) -> Bundle:
    """Check a bundle completely before anything in it is loaded; return it verified.

    With ``signing_key`` (raw Ed25519 public key) the manifest must carry a valid signature.
    """
    path = Path(path)
    manifest = read_manifest(path)
    digest = manifest_digest(manifest)
    if expected_digest is not None and digest != expected_digest:
        raise IntegrityError(
            f"bundle manifest digest is {digest}, expected {expected_digest}; the bundle was "
            "modified or is not the one this run uses"
        )
    if signing_key is not None:
        _check_signature(path, manifest, signing_key)
    listed = manifest["files"]
    for name in listed:
        if not isinstance(name, str) or "/" in name or "\\" in name or name in {"", ".", ".."}:
            raise IntegrityError(f"bundle lists an unsafe file name {name!r}")
    present = {p.name for p in path.iterdir()} - {MANIFEST, SIGNATURE}
    if missing := sorted(set(listed) - present):
        raise IntegrityError(f"bundle file(s) missing: {', '.join(missing)}")
    if extra := sorted(present - set(listed)):
        raise IntegrityError(f"bundle has unlisted file(s): {', '.join(extra)}")
    for name, meta in sorted(listed.items()):
        file_path = path / name
        if file_path.is_symlink() or not file_path.is_file():
            raise IntegrityError(f"bundle entry {name} is not a regular file")
        actual = file_sha256(file_path)
        if actual != meta.get("sha256"):
            raise IntegrityError(
                f"bundle file {name} is corrupt: sha256 {actual}, "
                f"manifest says {meta.get('sha256')}"
            )
    tensors = manifest["tensors"]
    seen: set[str] = set()
    for file_name in (ADAPTER_FILE, EMULATOR_FILE):
        header = read_header(path / file_name)
        for name, entry in header.items():
            meta = tensors.get(name)
            if meta is None or meta.get("file") != file_name:
                raise IntegrityError(f"{file_name}: tensor {name!r} is not in the manifest")
            if entry["dtype"] != meta["dtype"] or entry["shape"] != meta["shape"]:
                raise IntegrityError(
                    f"{file_name}: tensor {name!r} is {entry['dtype']}{entry['shape']}, manifest "
                    f"says {meta['dtype']}{meta['shape']}"
                )
            seen.add(name)
    if missing_tensors := sorted(set(tensors) - seen):
        raise IntegrityError(f"bundle tensors missing from files: {missing_tensors[:3]}")
    return Bundle(path, manifest, digest)


def quantized_embeddings(manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """The bundle's quantized-embeddings entry (None: embeddings stored in full)."""
    entry = manifest.get("compression", {}).get("embeddings")
    return dict(entry) if entry else None


def bundle_parts(manifest: Mapping[str, Any]) -> dict[str, int]:
    """Bytes of the bundle by part: embeddings (and head), adapter blocks, middle blocks, other
    tensors (norms), and files that are not tensors (tokenizer, config, manifest index)."""
    embedded = set((quantized_embeddings(manifest) or {}).get("tensors", ()))
    prefix = str(manifest.get("model", {}).get("block_prefix", ""))
    parts = {"embeddings": 0, "adapter blocks": 0, "middle blocks": 0, "other tensors": 0}
    for name, meta in manifest["tensors"].items():
        size = _DTYPE_BYTES.get(meta["dtype"], 4)
        for dim in meta["shape"]:
            size *= int(dim)
        base = name.rsplit(".", 1)[0] if name.endswith(_QUANT_PARTS) else name
        if base in embedded or _is_embedding(name):
            parts["embeddings"] += size
        elif meta["file"] == ADAPTER_FILE:
            parts["adapter blocks"] += size
        elif prefix and block_index(name, prefix) is not None:
            parts["middle blocks"] += size
        else:
            parts["other tensors"] += size
    tensor_files = sum(
        int(meta["size"])
        for name, meta in manifest["files"].items()
        if name in (ADAPTER_FILE, EMULATOR_FILE)
    )
    files = sum(int(meta["size"]) for meta in manifest["files"].values())
    parts["tokenizer and config"] = files - tensor_files
    return parts


_QUANT_PARTS = (".qweight", ".scales", ".zeros")
_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I32": 4, "I64": 8, "BOOL": 1}


def _is_embedding(name: str) -> bool:
    """Full-precision embeddings and head by their usual names (a bundle of before the
    embeddings entry, or ``emulator.embeddings='full'``)."""
    return any(part in name for part in ("embed_tokens", "wte", "word_embeddings", "lm_head"))


def quantized_modules(manifest: Mapping[str, Any]) -> list[str]:
    """Names of the emulator's quantized linears (empty for a full-precision bundle)."""
    quantization = manifest.get("compression", {}).get("quantization")
    return list(quantization["modules"]) if quantization else []


def factorized_modules(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The emulator's SVD-factorized linears, name -> {rank, ...} (empty when none)."""
    factorization = manifest.get("compression", {}).get("factorization")
    modules = factorization.get("modules") if isinstance(factorization, Mapping) else None
    return dict(modules) if isinstance(modules, Mapping) else {}


def pruned_mlps(manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """The emulator's channel-pruning entry (``emulator.prune``), or None when nothing was
    pruned."""
    pruning = manifest.get("compression", {}).get("pruning")
    return dict(pruning) if isinstance(pruning, Mapping) else None


def check_signature(path: Path | str, public_key: bytes) -> None:
    """Check only the manifest's signature (no file digests: a cheap status for displays);
    an ``IntegrityError`` says what is wrong. ``verify_bundle`` checks everything."""
    _check_signature(Path(path), read_manifest(Path(path)), public_key)


def _check_signature(path: Path, manifest: dict[str, Any], public_key: bytes) -> None:
    signature_path = path / SIGNATURE
    if signature_path.is_symlink():
        raise IntegrityError(f"{signature_path} is a symbolic link; a bundle holds regular files")
    if not signature_path.is_file() or signature_path.stat().st_size != SIGNATURE_BYTES:
        raise IntegrityError(f"bundle {path} is not signed ({SIGNATURE} missing or malformed)")
    try:
        verify(public_key, signature_path.read_bytes(), canonical_json(manifest))
    except SignatureError as err:
        raise IntegrityError(
            f"bundle {path}: the manifest signature does not verify with the coordinator's "
            "signing key; the bundle was altered or signed by someone else"
        ) from err


def load_bundle_model(bundle: Bundle, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load the emulator model (adapter blocks + kept middle) of a *verified* bundle.

    A full-precision bundle is an ordinary Hugging Face checkpoint. A quantized one is built from
    its config, its middle linears replaced by ``QuantLinear`` layers shaped from the manifest,
    then filled from the safetensors files; every stored tensor must find its place.
    """
    import transformers

    auto = getattr(transformers, bundle.manifest["model"]["auto_class"])
    quantized = quantized_modules(bundle.manifest)
    # from_pretrained would fill a factorized or quantized layer's missing dense weight with
    # random values (and only warn): such bundles are built from the config and filled exactly
    # (nor would it shape a pruned MLP's smaller layers)
    plain = not quantized and not factorized_modules(bundle.manifest)
    plain = plain and pruned_mlps(bundle.manifest) is None
    if plain and not quantized_embeddings(bundle.manifest):
        model: nn.Module = auto.from_pretrained(bundle.path, dtype=dtype, use_safetensors=True)
        return model.eval()
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(bundle.path)
    model = auto.from_config(config, dtype=dtype)
    return fill_bundle_model(model, bundle, lambda path: load_file(str(path)))


def fill_bundle_model(
    model: nn.Module,
    bundle: Bundle,
    read: Callable[[Path], dict[str, torch.Tensor]],
    *,
    assign: bool = False,
) -> nn.Module:
    """Give ``model`` the bundle's pruned, factorized and quantized layers (shaped from the
    manifest) and every tensor of the bundle's files, read with ``read`` (``assign``: take the
    tensors as they are, for a model built on the meta device); a tensor that finds no place,
    or a place left without a tensor, is an ``IntegrityError``."""
    from emulator.factorize import install_factorized_layers
    from emulator.prune import install_pruned_mlps
    from emulator.quant import install_quant_layers

    tensors = bundle.manifest["tensors"]
    pruning = pruned_mlps(bundle.manifest)
    try:  # pruned MLPs first: their (smaller) linears are what factors then replace
        if pruning is not None:
            install_pruned_mlps(model, pruning)
    except (AttributeError, ValueError, KeyError, TypeError) as err:
        raise IntegrityError(f"bundle's pruned MLPs do not fit its model: {err}") from err
    try:  # factors first: quantized factors live inside them (``{name}.down``, ``{name}.up``)
        install_factorized_layers(model, factorized_modules(bundle.manifest), tensors)
    except (AttributeError, ValueError, KeyError, TypeError) as err:
        raise IntegrityError(f"bundle's factorized layers do not fit its model: {err}") from err
    try:
        install_quant_layers(model, quantized_modules(bundle.manifest), tensors)
    except (AttributeError, ValueError, KeyError, TypeError) as err:
        raise IntegrityError(f"bundle's quantized layers do not fit its model: {err}") from err
    state: dict[str, torch.Tensor] = {}
    for file_name in (ADAPTER_FILE, EMULATOR_FILE):
        state.update(read(bundle.path / file_name))
    embeddings = quantized_embeddings(bundle.manifest)
    if embeddings:
        try:
            dtype = model.get_parameter(embeddings["tensors"][0]).dtype
            expand_embeddings(state, embeddings, dtype)
        except (AttributeError, KeyError, ValueError, RuntimeError) as err:
            raise IntegrityError(
                f"bundle's quantized embeddings do not fit its model: {err}"
            ) from err
    result = model.load_state_dict(state, strict=False, assign=assign)
    hf_model(model).tie_weights()
    tied = set(model.state_dict()) - set(unique_state(model))
    missing = sorted(set(result.missing_keys) - tied)
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing or result.unexpected_keys or empty:
        raise IntegrityError(
            f"bundle tensors do not fit its model: missing {(missing or empty)[:3]}, "
            f"unexpected {sorted(result.unexpected_keys)[:3]}"
        )
    return model.eval()


def load_bundle_tokenizer(bundle: Bundle) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundle.path)


def bundle_arch(bundle: Bundle) -> ArchSpec:
    from emulator.arch import REGISTRY

    return REGISTRY[bundle.model_type]
