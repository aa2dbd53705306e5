"""A data owner's training session: a verified bundle loaded once, reused across rounds.

Flower keeps simulation workers (Ray actors) alive across rounds, so the emulator is loaded once
per worker process and cached by bundle digest; each round only swaps in the global adapter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from emulator.adapter import AdaptedModel, attach_adapter
from emulator.bundle import (
    Bundle,
    bundle_arch,
    load_bundle_model,
    load_bundle_tokenizer,
    verify_bundle,
)
from emulator.forward import pick_device

log = logging.getLogger(__name__)


@dataclass
class Session:
    bundle: Bundle
    adapted: AdaptedModel
    tokenizer: Any
    device: torch.device


_SESSIONS: dict[str, Session] = {}


def open_session(bundle_path: Path | str, digest: str) -> Session:
    """Verify and load the bundle ``digest`` (once per process)."""
    if digest in _SESSIONS:
        return _SESSIONS[digest]
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    bundle = verify_bundle(bundle_path, expected_digest=digest)
    device = pick_device()
    model = load_bundle_model(bundle).to(device)
    plan = bundle.plan
    adapted = attach_adapter(model, bundle_arch(bundle), bundle.adapter, plan.emulator_to_full())
    session = Session(bundle, adapted, load_bundle_tokenizer(bundle), device)
    _SESSIONS.clear()  # one bundle per worker at a time
    _SESSIONS[digest] = session
    log.info("loaded bundle %s (%s) on %s", digest[:12], plan.label, device)
    return session
