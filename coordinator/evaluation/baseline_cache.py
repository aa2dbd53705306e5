"""The two full-model baselines' scores (full fine-tuning, full zero-shot), kept by what
determines them.

Full fine-tuning is the most expensive of the five settings and does not depend on the emulator:
the same model weights, training and held-out examples, prompt template and recipe give the same
adapter and the same score. A run (or a benchmark cell with another emulator, the same seed)
therefore reads the score back instead of training again. Full zero-shot depends on still less
(weights, held-out examples, template, scoring settings) and is kept the same way. The key is
a SHA-256 of everything that changes it; ``BASELINE_VERSION`` is bumped when the training or
scoring code changes what a key produces. ``eval.reuse_baseline=false`` recomputes them.

Stored as one small JSON per key under ``$OFFSITE_HOME/baselines/`` or ``$OFFSITE_BASELINES``
(owner-only, written atomically): a score, never weights or data.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from emulator.adapter import AdapterSpec
from emulator.digest import canonical_json, tensor_sha256
from emulator.scoring import Score
from offsite.config import OffsiteConfig
from offsite.data import Example
from offsite.host.paths import baseline_folder

BASELINE_VERSION = 2  # 2: length-bucketed, shared-prompt scoring (emulator.scoring)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over every named tensor of the model's state (name, dtype, shape, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        digest.update(tensor_sha256(tensor).encode())
    return digest.hexdigest()


def examples_digest(examples: Sequence[Example]) -> str:
    rows = [[e.text, e.label, e.completion] for e in examples]
    return hashlib.sha256(canonical_json(rows)).hexdigest()


def baseline_key(
    model_digest: str,
    adapter: AdapterSpec,
    train: Sequence[Example],
    held: Sequence[Example],
    template: str,
    config: OffsiteConfig,
) -> str:
    """What the full fine-tuning baseline's score depends on, as one digest."""
    settings = config.to_dict()
    payload: dict[str, Any] = {
        "version": BASELINE_VERSION,
        "model": model_digest,
        "adapter": adapter.to_dict(),
        "train_examples": examples_digest(train),
        "held_out": examples_digest(held),
        "template": template,
        "seed": config.seed,
        "train": settings["train"],
        "steps": {
            k: settings["federation"][k] for k in ("rounds", "num_clients", "fraction_train")
        },
        "data": {k: settings["data"][k] for k in ("max_words", "max_length")},
        "eval": {k: settings["eval"][k] for k in ("max_length", "batch_size", "precision")},
    }
    return hashlib.sha256(canonical_json(payload)).hexdigest()


def zero_shot_key(
    model_digest: str, held: Sequence[Example], template: str, config: OffsiteConfig
) -> str:
    """What the untouched full model's score depends on, as one digest."""
    settings = config.to_dict()
    payload: dict[str, Any] = {
        "version": BASELINE_VERSION,
        "setting": "full_zero_shot",
        "model": model_digest,
        "held_out": examples_digest(held),
        "template": template,
        "data": {"max_words": settings["data"]["max_words"]},
        "eval": {k: settings["eval"][k] for k in ("max_length", "batch_size", "precision")},
    }
    return hashlib.sha256(canonical_json(payload)).hexdigest()


def cached_baseline(key: str, folder: Path | None = None) -> tuple[Score, float] | None:
    """The stored (score, seconds it took to compute), or None (absent or unreadable)."""
    path = (folder or baseline_folder()) / f"{key}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        score = Score(
            str(data["metric"]), float(data["value"]), float(data["nll"]), int(data["count"])
        )
        return score, float(data["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a missing or damaged entry is recomputed, never trusted


def store_baseline(key: str, score: Score, seconds: float, folder: Path | None = None) -> Path:
    """Write the entry atomically (a reader never sees half a file)."""
    root = folder or baseline_folder()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    payload = {
        "metric": score.metric,
        "value": score.value,
        "nll": score.nll,
        "count": score.count,
        "seconds": seconds,
        "version": BASELINE_VERSION,
    }
    handle, temporary = tempfile.mkstemp(dir=root, prefix=".baseline-", suffix=".json")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        json.dump(payload, out)
    path = root / f"{key}.json"
    os.replace(temporary, path)
    return path
