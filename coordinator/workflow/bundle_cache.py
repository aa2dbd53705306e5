"""Emulator bundles kept by what determines them, so a second run does not build the same one.

Building the default emulator (a Fisher-metric SVD of every middle block, then int8) takes about
two of a default run's eight minutes, and what it builds depends only on the model (weights,
config, tokenizer files), ``emulator.*`` (with the content of a public-text file it names), the
adapter ``train.*`` asks for (policy, LoRA rank and alpha), the emulator code and torch: a
benchmark's seeds, a run with other federation settings, or the same command again build the
same bundle. A hit copies the cached bundle into the run folder and verifies every file's
digest against the manifest digest recorded when it was stored; an entry that does not verify
is dropped and the bundle built again. ``emulator.reuse_bundle=false`` always builds.

Stored under ``$OFFSITE_BUNDLES`` or ``$OFFSITE_HOME/bundles``: one folder per key, and its
manifest digest in ``<key>.digest``. A bundle from the cache is signed and shipped, so the
cache is the user's alone: a folder that is not owned by the user or that others can write is
not used. Each entry holds a whole bundle (~215 MB for the default model): at most
``MAX_ENTRIES`` are kept, the least recently used going first.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import emulator
from emulator.arch import ArchSpec
from emulator.build import build_configured_bundle
from emulator.bundle import Bundle, verify_bundle
from emulator.digest import canonical_json, file_sha256
from emulator.layers import LayerPlan
from emulator.tokenizers import Tokenizer
from offsite.catalog import resolve_model
from offsite.config import OffsiteConfig
from offsite.errors import IntegrityError
from offsite.host.paths import bundle_folder, private_folder

log = logging.getLogger(__name__)

BUNDLE_CACHE_VERSION = 2  # 2: model files, public text and emulator code in the key
MAX_ENTRIES = 4


def _files_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(f"{path.name}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _code_digest() -> str:
    """The emulator package's sources: a change to how bundles are built is a new key."""
    return _files_digest(sorted(Path(emulator.__file__).parent.glob("*.py")))


def _model_files_digest(name: str) -> str:
    """The model folder's files but its weights (config, tokenizer, generation config)."""
    folder = Path(resolve_model(name))
    if not folder.is_dir():
        return ""
    small = [
        p for p in folder.iterdir() if p.is_file() and p.suffix not in (".safetensors", ".bin")
    ]
    return _files_digest(small)


def bundle_key(model_digest: str, config: OffsiteConfig) -> str:
    """What the bundle a run builds depends on, as one digest."""
    train, settings = config.train, config.to_dict()["emulator"]
    public = Path(config.emulator.public_text).expanduser() if config.emulator.public_text else None
    payload: dict[str, Any] = {
        "version": BUNDLE_CACHE_VERSION,
        "model": model_digest,
        "model_files": _model_files_digest(config.model.name),
        "source": config.model.name,  # recorded in the manifest
        "emulator": {k: v for k, v in settings.items() if k != "reuse_bundle"},
        "public_text": file_sha256(public) if public is not None and public.is_file() else "",
        "adapter": [train.adapter, train.lora_r, train.lora_alpha],
        "code": _code_digest(),
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",  # distillation runs there
    }
    return hashlib.sha256(canonical_json(payload)).hexdigest()


def reuse_or_build(
    full_model: nn.Module,
    tokenizer: Tokenizer,
    arch: ArchSpec,
    config: OffsiteConfig,
    out_dir: Path,
    model_digest: str,
) -> tuple[LayerPlan, Bundle, bool]:
    """The run's plan and bundle in ``out_dir``: copied from the cache when the same model and
    settings built it before (True), else built and then cached (False)."""
    root = bundle_folder()
    if not config.emulator.reuse_bundle or not private_folder(
        root, "bundle cache", "$OFFSITE_BUNDLES"
    ):
        return (*build_configured_bundle(full_model, tokenizer, arch, config, out_dir), False)
    key = bundle_key(model_digest, config)
    entry, recorded = root / key, root / f"{key}.digest"
    if entry.is_dir() and recorded.is_file():
        found = _copy_verified(entry, recorded.read_text().strip(), out_dir)
        if found is not None:
            return found.plan, found, True
    plan, bundle = build_configured_bundle(full_model, tokenizer, arch, config, out_dir)
    _store(bundle, entry, recorded)
    return plan, bundle, False


def _copy_verified(entry: Path, digest: str, out_dir: Path) -> Bundle | None:
    """The cached bundle copied to ``out_dir`` and verified there against ``digest`` (one
    hashing pass: a copy that does not verify came from an entry that does not, so the entry
    is dropped too); None when it cannot be used."""
    shutil.rmtree(out_dir, ignore_errors=True)  # nothing but the bundle's own files
    try:
        shutil.copytree(entry, out_dir)
        bundle = verify_bundle(out_dir, digest)
    except IntegrityError as err:
        log.warning("  cached bundle %s is damaged (%s): building it again", entry, err)
        shutil.rmtree(entry, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)
        return None
    except OSError as err:
        log.warning("  could not copy the cached bundle (%s): building it", err)
        shutil.rmtree(out_dir, ignore_errors=True)
        return None
    with contextlib.suppress(OSError):
        os.utime(entry)  # recently used
    return bundle


def _store(bundle: Bundle, entry: Path, recorded: Path) -> None:
    """Copy the built bundle in as ``entry`` atomically (a reader never sees half an entry),
    record its digest, and drop the least recently used entries beyond ``MAX_ENTRIES``. A
    failure only costs the next run a build: it is logged, never raised."""
    root = entry.parent
    staging: Path | None = None
    try:
        staging = Path(tempfile.mkdtemp(dir=root, prefix=".bundle-"))
        shutil.copytree(bundle.path, staging, dirs_exist_ok=True)
        staging.chmod(0o700)
        if entry.exists():  # another run stored it meanwhile: theirs stays
            return
        os.replace(staging, entry)
        staging = None
        temporary = recorded.with_name(recorded.name + ".tmp")
        temporary.write_text(bundle.digest)
        os.replace(temporary, recorded)
        _evict(root)
    except OSError as err:
        log.warning("  could not cache the bundle in %s (%s); the next run builds it", root, err)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _evict(root: Path) -> None:
    entries = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for stale in entries[MAX_ENTRIES:]:
        shutil.rmtree(stale, ignore_errors=True)
        (root / f"{stale.name}.digest").unlink(missing_ok=True)
