"""Emulator bundles kept by what determines them, so a second run does not build the same one.

Building the default emulator (a Fisher-metric SVD of every middle block, then int8) takes about
two of a default run's eight minutes, and what it builds depends only on the model's weights,
``emulator.*`` and the adapter ``train.*`` asks for (policy, LoRA rank and alpha): a benchmark's
seeds, a run with other federation settings, or the same command again build the same bundle.
A hit copies the cached bundle into the run folder and verifies every file's digest before the
run uses it; an entry that does not verify is dropped and the bundle built again.
``emulator.reuse_bundle=false`` always builds.

Stored under ``$OFFSITE_BUNDLES`` or ``$OFFSITE_HOME/bundles``, one folder per key, owner-only;
each entry holds a whole bundle (~215 MB for the default model), so at most ``MAX_ENTRIES`` are
kept and the least recently used goes first. ``BUNDLE_CACHE_VERSION`` is bumped when the build
code changes what a key produces.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from emulator.arch import ArchSpec
from emulator.build import build_configured_bundle
from emulator.bundle import Bundle, verify_bundle
from emulator.digest import canonical_json
from emulator.layers import LayerPlan
from emulator.tokenizers import Tokenizer
from offsite.config import OffsiteConfig
from offsite.errors import IntegrityError
from offsite.host.paths import offsite_home

log = logging.getLogger(__name__)

BUNDLE_CACHE_VERSION = 1
MAX_ENTRIES = 4


def bundle_folder() -> Path:
    """``$OFFSITE_BUNDLES`` (e.g. a folder a team shares), else ``$OFFSITE_HOME/bundles``."""
    shared = os.environ.get("OFFSITE_BUNDLES")
    return Path(shared).expanduser() if shared else offsite_home() / "bundles"


def bundle_key(model_digest: str, config: OffsiteConfig) -> str:
    """What the bundle a run builds depends on, as one digest."""
    train = config.train
    payload: dict[str, Any] = {
        "version": BUNDLE_CACHE_VERSION,
        "model": model_digest,
        "source": config.model.name,  # recorded in the manifest
        "emulator": {k: v for k, v in config.to_dict()["emulator"].items() if k != "reuse_bundle"},
        "adapter": [train.adapter, train.lora_r, train.lora_alpha],
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
    """The run's plan and bundle in ``out_dir``: copied from the cache when the same weights
    and settings built it before (True), else built and then cached (False)."""
    if not config.emulator.reuse_bundle:
        return (*build_configured_bundle(full_model, tokenizer, arch, config, out_dir), False)
    entry = bundle_folder() / bundle_key(model_digest, config)
    if entry.is_dir():
        try:
            shutil.copytree(entry, out_dir, dirs_exist_ok=True)
            bundle = verify_bundle(out_dir)
            os.utime(entry)  # recently used
            return bundle.plan, bundle, True
        except (OSError, IntegrityError) as err:
            log.warning("  cached bundle %s is unusable (%s): building it again", entry, err)
            shutil.rmtree(out_dir, ignore_errors=True)
            shutil.rmtree(entry, ignore_errors=True)
    plan, bundle = build_configured_bundle(full_model, tokenizer, arch, config, out_dir)
    _store(bundle.path, entry)
    return plan, bundle, False


def _store(built: Path, entry: Path) -> None:
    """Copy ``built`` in as ``entry`` atomically (a reader never sees half an entry); drop the
    least recently used entries beyond ``MAX_ENTRIES``. A failure only costs the next run a
    build: it is logged, never raised."""
    root = entry.parent
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=".bundle-"))
        shutil.copytree(built, staging, dirs_exist_ok=True)
        os.replace(staging, entry)
        entries = sorted(
            (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for stale in entries[MAX_ENTRIES:]:
            shutil.rmtree(stale, ignore_errors=True)
    except OSError as err:
        log.warning("  could not cache the bundle in %s (%s); the next run builds it", root, err)
